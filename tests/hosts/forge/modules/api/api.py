# Follows modules/api/api.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.a1111.modules.api.api import *  # noqa: F401,F403
