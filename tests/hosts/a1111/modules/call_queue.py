# Follows modules/call_queue.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/call_queue.py: the FIFOLock every generation holds."""
from tests.hosts.common.webui import FIFOLock

queue_lock = FIFOLock()
