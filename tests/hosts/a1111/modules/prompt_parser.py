# Follows modules/prompt_parser.py of A1111 v1.10.1 (tag v1.10.1).
from tests.hosts.common.prompt_parser import *  # noqa: F401,F403
from tests.hosts.common.prompt_parser import SdConditioning, ScheduledPromptConditioning  # noqa: F401
