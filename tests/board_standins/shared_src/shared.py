"""modules/shared.py: opts, state, cmd_opts, OptionInfo and the lazily-loading ``sd_model`` (both hosts'
shared_items.Shared: reading it asks sd_models.model_data)."""
import sys
import types

from tests.board_standins.common import OptionInfo, Options, State

opts = Options(sd_model_checkpoint="", sd_checkpoints_limit=1)
state = State()
cmd_opts = types.SimpleNamespace(ckpt=None, ckpt_dir=None, nowebui=False)


class _Shared(types.ModuleType):
    @property
    def sd_model(self):
        # reading shared.sd_model loads the selected checkpoint when none is loaded
        from modules import sd_models

        return sd_models.model_data.get_sd_model()


sys.modules[__name__].__class__ = _Shared
__all__ = ["OptionInfo", "opts", "state", "cmd_opts"]
