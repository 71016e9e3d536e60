# Follows modules/scripts.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/scripts.py: alike in A1111 v1.10.1 and Forge; one source in ../../shared_src."""
from tests.hosts.common import exec_shared

exec_shared("scripts", globals())
