# Follows modules/call_queue.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/call_queue.py: the FIFOLock every generation holds."""
from tests.hosts.common.webui import FIFOLock

queue_lock = FIFOLock()
