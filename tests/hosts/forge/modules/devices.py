from tests.hosts.a1111.modules.devices import *  # noqa: F401,F403  (identical in Forge in the parts we use)
