"""modules/call_queue.py: the FIFOLock every generation holds."""
from modules.fifo_lock import FIFOLock

queue_lock = FIFOLock()
