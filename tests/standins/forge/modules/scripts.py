from tests.standins.a1111.modules.scripts import *  # noqa: F401,F403  (identical in Forge in the parts we use)
from tests.standins.a1111.modules.scripts import AlwaysVisible, ScriptClassData, scripts_data  # noqa: F401,E402
