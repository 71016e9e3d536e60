"""Planning: every check that can be made from the headers alone, made before any tensor data is
read, with all problems reported at once; then one job per output key (merge, copy or drop,
with its block and resolved parameters)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .arch import BLOCK_POLICIES, ModelInfo, block_of, detect_architecture, kept_from_a, key_kind
from .arch.detect import is_prediction_marker, prediction_type
from .blocks import parse_block_weights
from .errors import ArchitectureMismatchError, BadParameterError, CorruptFileError, MergeError
from .inputs import VirtualInput, parse_model_ref
from .io.dtypes import key_output_dtype, output_dtype
from .io.reader import CheckpointReader, open_checkpoint
from .methods.registry import MethodSpec, get_method
from .recipe import Recipe

INPAINT_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass
class KeyJob:
    key: str
    action: str  # "merge" | "copy"
    block: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: dict[str, Any]
    sources: tuple[int, ...]  # model indices read for this key (copy: (0,))
    identity: bool = False  # the method's per-block ratios are all 0 here: output = A
    common_channels: int | None = None  # inpainting conv_in: merge only the shared input channels
    patches: Any = None  # LoRA patches baked in after the method (lib_merge.lora.patches.Patch list)

    @property
    def nbytes_out(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    inputs: list[CheckpointReader | VirtualInput]
    info: ModelInfo
    jobs: list[KeyJob]
    warnings: list[str] = field(default_factory=list)
    block_values: dict[str, dict[str, float]] = field(default_factory=dict)
    prediction: str | None = None  # the output's prediction type (its markers' model)

    @property
    def readers(self) -> list[CheckpointReader]:
        return [r for r in self.inputs if isinstance(r, CheckpointReader)]

    @property
    def largest_tensor_bytes(self) -> int:
        largest = 0
        for job in self.jobs:
            n = 1
            for d in job.shape:
                n *= d
            largest = max(largest, n)
        return largest * 4  # fp32 working copy

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def open_inputs(models: Sequence[str]) -> list[CheckpointReader | VirtualInput]:
    """Open every model reference, collecting every unreadable file into one error."""
    opened: list[CheckpointReader | VirtualInput] = []
    problems: list[str] = []
    for ref in models:
        parsed = parse_model_ref(ref)
        if isinstance(parsed, VirtualInput):
            opened.append(parsed)
            continue
        try:
            opened.append(open_checkpoint(parsed))
        except MergeError as exc:
            problems.append(str(exc))
    if problems:
        for r in opened:
            if isinstance(r, CheckpointReader):
                r.close()
        raise CorruptFileError("; ".join(problems))
    return opened


def bakes_loras_into_a(recipe: Recipe) -> bool:
    """`merge A --lora X`: one model and LoRAs — every block is A, the LoRAs go on top (the planner
    and the live preview both plan such a recipe this way)."""
    return bool(recipe.loras) and len(recipe.models) == 1


def plan_merge(recipe: Recipe, inputs: Sequence[CheckpointReader | VirtualInput]) -> MergePlan:
    method = get_method(recipe.method)
    if recipe.blocks not in BLOCK_POLICIES:
        raise BadParameterError(
            f"block policy {recipe.blocks!r} is unknown; choose one of {', '.join(BLOCK_POLICIES)}"
        )
    lora_only = bakes_loras_into_a(recipe)
    if not lora_only:
        method.check_model_count(len(inputs))
    method_params(method, recipe)  # parameter errors first, before any file is read
    out_dtype = output_dtype(recipe.dtype)

    template = inputs[0]
    if not isinstance(template, CheckpointReader):
        raise BadParameterError("model A must be a checkpoint file, not a virtual input (noise/zero)")
    readers = [(i, r) for i, r in enumerate(inputs) if isinstance(r, CheckpointReader)]
    labels = [_label(i, r) for i, r in enumerate(inputs)]

    infos = {}
    problems: list[str] = []
    for i, reader in readers:
        try:
            infos[i] = detect_architecture(reader.shapes(), reader.metadata, source=str(reader.path))
        except MergeError as exc:
            problems.append(str(exc))
    if problems:
        raise ArchitectureMismatchError("; ".join(problems))
    arch = infos[0].arch
    odd = [f"{labels[i]} is {info.arch.label}" for i, info in infos.items() if info.arch.name != arch.name]
    if odd:
        raise ArchitectureMismatchError(
            f"cannot merge {arch.label} model A ({template.path.name}) with: {', '.join(odd)}; "
            "pick models of one architecture"
        )
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for i, reader in readers if method.variadic else ():
        real = str(reader.path.resolve())
        if real in seen:
            warnings.append(
                f"{labels[i]} is the same file as {labels[seen[real]]}; it counts twice "
                "(task-vector methods already count A as the base)"
            )
        seen.setdefault(real, i)
    prediction, marker_source = _prediction(recipe, readers, infos, labels, warnings)
    per_block, block_values = block_settings(method, arch, recipe, len(inputs))

    # Shapes and key sets, checked for every model before reading any data.
    a_infos = template.infos
    shape_problems: list[str] = []
    missing_by_model: dict[int, list[str]] = {}
    conv_in_channels: dict[int, int] = {}
    for i, reader in readers[1:]:
        # keys the merge drops anyway (EMA weights) are not "missing" from a pruned model
        missing = [k for k, info in a_infos.items() if k not in reader.infos and key_kind(k, info.dtype, info.shape) != "drop"]
        if missing:
            missing_by_model[i] = missing
        for key, a_info in a_infos.items():
            other = reader.infos.get(key)
            if other is None or other.shape == a_info.shape:
                continue
            if key == INPAINT_CONV_IN and len(other.shape) == 4 and other.shape[0] == a_info.shape[0] \
                    and other.shape[2:] == a_info.shape[2:]:
                conv_in_channels[i] = other.shape[1]
                continue
            if key_kind(key, a_info.dtype, a_info.shape) == "merge":
                shape_problems.append(f"{key}: A {list(a_info.shape)} vs {labels[i]} {list(other.shape)}")
    if shape_problems:
        more = f" (+{len(shape_problems) - 5} more)" if len(shape_problems) > 5 else ""
        raise ArchitectureMismatchError(
            f"shapes differ between the models: {'; '.join(shape_problems[:5])}{more}; "
            "these models have different layouts and cannot be merged"
        )
    for i, missing in missing_by_model.items():
        warnings.append(
            f"{labels[i]} lacks {len(missing)} key(s) of A (e.g. {missing[0]}); those keys are copied from A"
        )
    if conv_in_channels:
        warnings.append(
            "inpainting and normal models mixed: conv_in merges the shared "
            f"{min(list(conv_in_channels.values()) + [a_infos[INPAINT_CONV_IN].shape[1]])} input channels; "
            "the rest are taken from A"
        )
    if out_dtype == torch.float16 and any(
        info.dtype == "BF16" for _, r in readers for info in r.infos.values()
    ):
        warnings.append("bf16 input saved as fp16: values beyond ±65504 would overflow; use --dtype bf16 to keep the range")

    jobs: list[KeyJob] = []
    for key, a_info in sorted(a_infos.items(), key=lambda kv: kv[1].offset):
        kind = key_kind(key, a_info.dtype, a_info.shape)
        if kind == "drop":
            continue
        block = block_of(arch, key, recipe.blocks)
        if marker_source and is_prediction_marker(key):
            continue  # the markers come from the model --allow-mixed-prediction chose (below)
        if kind == "copy" or kept_from_a(arch, key, recipe.blocks) or any(key in m for m in missing_by_model.values()):
            jobs.append(KeyJob(key, "copy", block, a_info.shape, a_info.torch_dtype, {}, (0,)))
            continue
        key_params, identity, sources = per_block[block]
        common = None
        if key == INPAINT_CONV_IN and conv_in_channels:
            common = min(list(conv_in_channels.values()) + [a_info.shape[1]])
        if lora_only:
            key_params, identity, sources = {}, True, (0,)
        dtype = key_output_dtype(out_dtype, key, recipe.fp8_all)
        jobs.append(KeyJob(key, "merge", block, a_info.shape, dtype, dict(key_params), sources, identity, common))
    if marker_source:
        chosen = inputs[marker_source]
        for key, info in chosen.infos.items():
            if is_prediction_marker(key):
                jobs.append(KeyJob(key, "copy", "BASE", info.shape, info.torch_dtype, {}, (marker_source,)))

    prepass = getattr(method.fn, "prepass", None)
    if prepass is not None and not lora_only:
        # a whole-model pass (supermerger's cosine: one similarity range for every key), run once
        # here so the engine and the live merge see the same values in every merged key's params
        shared = prepass(MergePlan(recipe, method, list(inputs), infos[0], jobs))
        for job in jobs:
            if job.action == "merge":
                job.params.update(shared)
    return MergePlan(recipe, method, list(inputs), infos[0], jobs, warnings, block_values, prediction)


def _prediction(recipe: Recipe, readers, infos, labels, warnings: list[str]) -> tuple[str | None, int]:
    """The output's prediction type and the model whose markers it keeps (0: A, copied as every
    marker always was). Disagreeing inputs are refused unless the recipe names that model."""
    types = {i: prediction_type(infos[i], reader.infos) for i, reader in readers}
    known = {t for t in types.values() if t is not None}
    choice = recipe.prediction
    index = 0
    if choice is not None:
        letters = [chr(ord("A") + i) for i in range(len(labels))]
        index = letters.index(choice.strip().upper()) if choice.strip().upper() in letters else -1
        if index not in types:
            raise BadParameterError(f"--allow-mixed-prediction {choice!r}: name a model file, one of "
                                    f"{', '.join(letters[i] for i in types)}")
    if len(known) > 1:
        listing = ", ".join(f"{labels[i]} is {t or 'unknown'}" for i, t in types.items())
        if choice is None:
            raise BadParameterError(
                f"the models predict different targets ({listing}); a blend of eps and v weights predicts neither. "
                "Merge models of one prediction type, or pass --allow-mixed-prediction [A|B|…] to merge anyway, "
                "keeping that model's markers (e.g. an add-difference onto a v base)")
        warnings.append(f"mixed prediction types ({listing}); the output keeps the markers of {labels[index]}: "
                        f"{types[index] or 'unknown'}")
    return types.get(index), index



BlockSetting = tuple[dict[str, Any], bool, tuple[int, ...]]  # parameters, identity?, inputs read


def method_params(method: MethodSpec, recipe: Recipe) -> dict[str, Any]:
    """The method's parameters for ``recipe`` (α/β included), checked against its block weights."""
    params = method.resolve_params(recipe.params)
    for name, value in (("alpha", recipe.alpha), ("beta", recipe.beta)):
        if value is not None:
            params[name] = method.param(name).coerce(value, method.name)
            if isinstance(params[name], float) and not math.isfinite(params[name]):
                # caught here, before it becomes the default of every block and is reported as one
                raise BadParameterError(f"{name}={value!r} is not a finite number; give a ratio such as 0.5")
    if recipe.weights is not None and "alpha" not in method.block_params:
        raise BadParameterError(f"method {method.name} has no per-block ratio; drop --weights")
    if recipe.beta_weights is not None and "beta" not in method.block_params:
        raise BadParameterError(f"method {method.name} has no β; drop the beta weights")
    return params


def block_settings(method: MethodSpec, arch, recipe: Recipe, n_inputs: int
                   ) -> tuple[dict[str, BlockSetting], dict[str, dict[str, float]]]:
    """Per block of ``arch``: the parameters with α/β resolved for the block, whether the block is
    exactly A (all its ratios 0 for a method that is A at 0: only A is read), and the inputs read;
    plus the per-block α/β values. The one rule for the planner and the live merge."""
    params = method_params(method, recipe)
    alpha_blocks = parse_block_weights(recipe.weights, arch, base=params.get("alpha", 0.0)) if "alpha" in params else {}
    beta_blocks = parse_block_weights(recipe.beta_weights, arch, base=params.get("beta", 0.0)) if "beta" in params else {}
    identity_params = [p for p in method.block_params if p in params]
    everything = tuple(range(n_inputs))
    per_block: dict[str, BlockSetting] = {}
    for block in arch.blocks:
        key_params = dict(params)
        if "alpha" in key_params:
            key_params["alpha"] = alpha_blocks[block]
        if "beta" in key_params:
            key_params["beta"] = beta_blocks[block]
        identity = bool(identity_params) and all(key_params[p] == 0 for p in identity_params) \
            and method.name in IDENTITY_AT_ZERO
        per_block[block] = (key_params, identity, (0,) if identity else everything)
    block_values = {name: values for name, values in (("alpha", alpha_blocks), ("beta", beta_blocks)) if values}
    return per_block, block_values


# Methods whose result is exactly A when every per-block ratio is 0: those keys skip reading B.
IDENTITY_AT_ZERO = frozenset({
    "weighted_sum", "add_difference", "train_difference", "triple_sum", "sum_twice", "slerp",
    # task-vector methods: A + α·τ is A at α = 0
    "task_arithmetic", "ties", "dare", "della", "breadcrumbs", "model_stock", "geometric_median",
    "ties_soup", "tgmd", "dgmla",
})


def _label(index: int, ref: CheckpointReader | VirtualInput) -> str:
    letter = chr(ord("A") + index) if index < 26 else f"#{index + 1}"
    name = ref.path.name if isinstance(ref, CheckpointReader) else ref.spec
    return f"{letter} ({name})"


def model_label(index: int, ref: CheckpointReader | VirtualInput) -> str:
    return _label(index, ref)


