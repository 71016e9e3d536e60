# Follows modules/infotext_utils.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.a1111.modules.infotext_utils import *  # noqa: F401,F403  (identical in Forge in the parts we use)
