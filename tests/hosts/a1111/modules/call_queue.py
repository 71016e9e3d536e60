"""modules/call_queue.py: the FIFOLock every generation holds."""
from tests.hosts.common.webui import FIFOLock

queue_lock = FIFOLock()
