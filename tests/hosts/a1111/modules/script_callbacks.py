# Follows modules/script_callbacks.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/script_callbacks.py: alike in A1111 v1.10.1 and Forge; one source in ../../shared_src."""
from tests.hosts.common import exec_shared

exec_shared("script_callbacks", globals())
