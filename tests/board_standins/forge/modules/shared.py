"""modules/shared.py: the same in A1111 1.10 and Forge as far as the board reads it; one source in ../../shared_src."""
from tests.board_standins.common import exec_shared

exec_shared("shared", globals())
