# Follows modules/errors.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.a1111.modules.errors import *  # noqa: F401,F403  (identical in Forge in the parts we use)
