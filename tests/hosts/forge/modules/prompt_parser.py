# Follows modules/prompt_parser.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.common.prompt_parser import *  # noqa: F401,F403
from tests.hosts.common.prompt_parser import SdConditioning, ScheduledPromptConditioning  # noqa: F401
