"""The recipe's LoRAs in the live preview: the files kept open for the session and bound to the
plan with the save path's own functions (``lib_merge.lora.attach``), and a signature per key of
every patch that touches it.

A file is keyed by its identity (resolved path, size, mtime): a file rewritten on disk is opened
anew and the keys it touches get a new signature, so they are re-patched. A file is checked once,
when it is opened: every floating tensor must be finite, so a damaged LoRA is refused before any
key is written (the preview keeps what it held) rather than half-way through a patch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.finite import all_finite
from ..errors import CorruptFileError
from ..lora.attach import bind_to_plan, lora_specs, open_loras
from ..lora.formats import LoraFile
from ..lora.patches import LoraSpec, Patch
from ..plan import MergePlan
from .changes import file_identity


@dataclass
class LoraPatches:
    """The bound LoRAs of one recipe: per checkpoint key its patches (application order) and
    their signature; ``token`` changes whenever any patch of any key may have changed."""

    token: Any = None  # None: no LoRA
    patches: dict[str, list[Patch]] = field(default_factory=dict)
    signatures: dict[str, tuple] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


NO_LORAS = LoraPatches()


class SessionLoras:
    """The LoRA files of a live session, open until ``close``, and the binding of the last
    recipe's LoRA list (re-bound only when the list, a file, the plan or the block policy changes).
    The caller serialises every call."""

    def __init__(self) -> None:
        self._files: dict[tuple, LoraFile] = {}
        self._identity_of: dict[int, tuple] = {}  # id(LoraFile) -> its identity
        self._bound: tuple[Any, MergePlan, LoraPatches] | None = None

    def bind(self, recipe, plan: MergePlan) -> LoraPatches:
        """The patches of ``recipe.loras`` on ``plan``'s keys; raises ``MergeError`` (one
        sentence naming every bad file) before anything is written."""
        specs = lora_specs(recipe)
        if not specs:
            return NO_LORAS
        identities = [file_identity(Path(spec.path)) for spec in specs]
        token = (tuple((ident, spec.strength, repr(spec.weights)) for ident, spec in zip(identities, specs)),
                 recipe.blocks)
        bound = self._bound
        if bound is not None and bound[0] == token and bound[1] is plan:
            return bound[2]
        order = iter(identities)  # open_loras calls the opener once per spec, in order
        files = open_loras(specs, [], lambda spec: self._open(spec, next(order)))
        binding = bind_to_plan(plan, files, specs, recipe.blocks)
        signatures = {key: tuple((self._identity_of[id(p.lora)], p.module.name, p.role, p.strength) for p in patches)
                      for key, patches in binding.patches.items()}
        result = LoraPatches(token, binding.patches, signatures, binding.warnings)
        self._bound = (token, plan, result)
        return result

    def _open(self, spec: LoraSpec, identity: tuple) -> LoraFile:
        lora = self._files.get(identity)
        if lora is not None:
            return lora
        for old in [i for i in self._files if i[0] == identity[0]]:  # the file changed on disk
            self._drop(old)
        lora = LoraFile(spec.path)
        try:
            _check_finite(lora)
        except BaseException:
            lora.close()
            raise
        self._files[identity] = lora
        self._identity_of[id(lora)] = identity
        return lora

    def _drop(self, identity: tuple) -> None:
        lora = self._files.pop(identity)
        self._identity_of.pop(id(lora), None)
        self._bound = None
        lora.close()

    def close(self) -> None:
        for identity in list(self._files):
            self._drop(identity)
        self._bound = None


def _check_finite(lora: LoraFile) -> None:
    for key in lora.reader.infos:
        tensor = lora.reader.get(key)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CorruptFileError(f"LoRA {lora.path}: NaN/Inf in {key}; the file is damaged — re-download it "
                                   "or remove it from the LoRA list")
