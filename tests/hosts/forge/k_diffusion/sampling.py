# Follows k_diffusion/sampling.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.a1111.k_diffusion.sampling import *  # noqa: F401,F403
from tests.hosts.a1111.k_diffusion.sampling import to_d  # noqa: F401
torch = __import__('torch')
