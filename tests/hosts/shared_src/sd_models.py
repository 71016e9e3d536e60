# Follows modules/sd_models.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/sd_models.py, the checkpoint list A1111 1.10 and Forge keep alike: model_path,
checkpoints_list / checkpoint_aliases, CheckpointInfo.register, list_models (with its reset of the
selected checkpoint to a --ckpt file), the closest match
and select_checkpoint. Each host's sd_models.py runs this and adds how it loads models (and its
own checkpoint_tiles: Forge lists names, A1111 titles)."""
from pathlib import Path

from modules import shared
from tests.hosts.common.webui import CheckpointInfo as _Info

model_path = ""
checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo(_Info):
    def __init__(self, filename):
        super().__init__(filename, model_path)

    def register(self):
        checkpoints_list[self.title] = self
        checkpoint_aliases[self.name] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    cmd_ckpt = getattr(shared.cmd_opts, "ckpt", None)
    if cmd_ckpt and Path(cmd_ckpt).exists():
        # both hosts: a --ckpt file becomes the selected checkpoint again on every refresh
        info = CheckpointInfo(cmd_ckpt)
        info.register()
        shared.opts.data["sd_model_checkpoint"] = info.title
    for path in sorted(Path(model_path).rglob("*.safetensors")):
        CheckpointInfo(str(path)).register()


def get_closet_checkpoint_match(search_string):
    return checkpoint_aliases.get(search_string) or checkpoints_list.get(search_string)


def select_checkpoint():
    return get_closet_checkpoint_match(shared.opts.sd_model_checkpoint) or next(iter(checkpoints_list.values()), None)
