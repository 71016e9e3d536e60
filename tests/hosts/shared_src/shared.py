# Follows modules/shared.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/shared.py with shared_items.Shared, alike in A1111 v1.10.1 and Forge: opts, state, cmd_opts,
OptionInfo, and ``sd_model`` as a module property (reading it asks sd_models.model_data, which in
A1111 loads the selected checkpoint when none is loaded; assigning it sets model_data's model).
The host module sets ``HOST_OPTS`` (the options its sampler loop reads) before running this."""
# ruff: noqa: F821  (HOST_OPTS is set by the host module before it runs this)
import sys
import types

from tests.hosts.common.webui import OptionInfo, Options, State  # noqa: F401

opts = Options(sd_model_checkpoint="", sd_checkpoints_limit=1, **HOST_OPTS)
state = State()
cmd_opts = types.SimpleNamespace(ckpt=None, ckpt_dir=None, nowebui=False)
device = "cpu"


class _Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = _Shared
