"""modules/script_callbacks.py: identical in A1111 1.10 and Forge; one source in ../../shared_src."""
from tests.board_standins.common import exec_shared

exec_shared("script_callbacks", globals())
