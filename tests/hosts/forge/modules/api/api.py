from tests.hosts.a1111.modules.api.api import *  # noqa: F401,F403
