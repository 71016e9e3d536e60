from tests.board_standins.common import FIFOLock  # noqa: F401  (modules/fifo_lock.py)
