"""Extract a LoRA of B − A (lora-reference.md §4): per kohya-trainable module, Δ in fp32, its
rank-r factors by SVD (exact, or randomized and seeded per key), kohya layout and metadata.

Keys run on a few threads, each holding one module's A and B slices, Δ and its SVD; only the
factors (the output, at most the size of the file written) stay in memory. The report gives the
retained energy Σ kept σ² / ‖Δ‖² per block, which for a rank-r factorisation is exactly
1 − (relative squared Frobenius error), randomized SVD included.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import block_of, detect_architecture
from ..errors import ArchitectureMismatchError, BadParameterError
from ..io.reader import open_checkpoint
from ..methods.registry import key_seed
from .output import lora_metadata, write_lora
from .svd import factorize
from .synthetic import lora_targets

# kohya drops the whole text encoder when no TE module moved by more than this (max |Δ|)
TE_MIN_DIFF = 0.01
OUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ExtractOptions:
    rank: int = 64
    conv_rank: int | None = None  # None: 3×3 convs are not extracted (kohya without --conv_dim)
    energy: float | None = None
    clamp_quantile: float | None = None
    text_encoders: bool = False
    randomized: bool = False
    dtype: str = "fp16"
    threads: int = 2
    seed: int = 0


@dataclass
class ExtractReport:
    path: Path
    modules: int
    seconds: float
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # block → (kept, total)
    ranks: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"wrote {self.path}: {self.modules} modules, rank {min(self.ranks, default=0)}–"
                 f"{max(self.ranks, default=0)}, {self.seconds:.1f} s", "retained energy per block (Σ kept σ² / ‖B−A‖²):"]
        for block, (kept, total) in self.energy.items():
            lines.append(f"  {block:6s} {kept / total:8.4f}" if total else f"  {block:6s}   (no change)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _check(options: ExtractOptions) -> None:
    if options.rank < 1 or (options.conv_rank is not None and options.conv_rank < 1):
        raise BadParameterError("--rank and --conv-rank must be ≥ 1")
    if options.energy is not None and not 0 < options.energy <= 1:
        raise BadParameterError(f"--energy {options.energy}: give a fraction in (0, 1], e.g. 0.9")
    if options.clamp_quantile is not None and not 0 < options.clamp_quantile <= 1:
        raise BadParameterError(f"--clamp-quantile {options.clamp_quantile}: give a fraction in (0, 1], e.g. 0.99")
    if options.dtype not in OUT_DTYPES:
        raise BadParameterError(f"dtype {options.dtype!r}: choose one of {', '.join(OUT_DTYPES)}")


def extract_lora(a_path, b_path, output, options: ExtractOptions, *, overwrite: bool = False) -> ExtractReport:
    _check(options)
    started = time.perf_counter()
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    try:
        info_a = detect_architecture(a.shapes(), a.metadata, source=str(a.path))
        info_b = detect_architecture(b.shapes(), b.metadata, source=str(b.path))
        if info_a.arch.name != info_b.arch.name:
            raise ArchitectureMismatchError(
                f"cannot extract between {info_a.arch.label} A ({a.path.name}) and {info_b.arch.label} B ({b.path.name})")
        arch = info_a.arch
        targets = lora_targets(a.shapes(), arch.name, conv=options.conv_rank is not None, text=options.text_encoders)
        problems = [f"{t.key} {list(a.infos[t.key].shape)} vs {list(b.infos[t.key].shape) if t.key in b.infos else 'missing'}"
                    for t, _ in targets.values() if t.key not in b.infos or a.infos[t.key].shape != b.infos[t.key].shape]
        if problems:
            raise ArchitectureMismatchError(f"A and B differ in {len(problems)} layer(s) (e.g. {problems[0]})")
        report = ExtractReport(Path(output), 0, 0.0)
        names = list(targets)
        if options.text_encoders:
            names = _drop_unchanged_text(a, b, targets, names, report)
        out_dtype = OUT_DTYPES[options.dtype]

        def one(name: str):
            target, shape = targets[name]
            torch.set_num_threads(1)
            wa, wb = a.get(target.key), b.get(target.key)
            if target.rows is not None:
                wa, wb = wa[target.rows[0]:target.rows[1]], wb[target.rows[0]:target.rows[1]]
            delta = wb.float() - wa.float()
            del wa, wb
            conv3 = delta.dim() == 4 and delta.shape[2:] != (1, 1)
            if delta.dim() == 4 and not conv3:
                delta = delta.reshape(delta.shape[:2])  # 1×1 conv: kohya stores a 4-D pair of its squeeze
            rank = options.conv_rank if conv3 and options.conv_rank else options.rank
            gen = torch.Generator().manual_seed(key_seed(options.seed, name, "svd"))
            f = factorize(delta, rank, energy=options.energy, clamp_quantile=options.clamp_quantile,
                          randomized=options.randomized, generator=gen)
            up, down = f.up, f.down
            if len(shape) == 4 and not conv3:
                up, down = up.reshape(*up.shape, 1, 1), down.reshape(*down.shape, 1, 1)
            return name, target.key, conv3, up.to(out_dtype), down.to(out_dtype), f

        tensors: dict[str, torch.Tensor] = {}
        dims, conv_dims = [], []
        with ThreadPoolExecutor(max_workers=max(1, options.threads)) as pool:
            for name, key, conv3, up, down, f in pool.map(one, names):
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.alpha"] = torch.tensor(float(f.rank), dtype=out_dtype)
                (conv_dims if conv3 else dims).append(f.rank)
                report.ranks.append(f.rank)
                block = block_of(arch, key)
                kept, total = report.energy.get(block, (0.0, 0.0))
                report.energy[block] = (kept + f.kept, total + f.total)
        report.energy = {blk: report.energy[blk] for blk in arch.blocks if blk in report.energy}
        if not tensors:
            raise BadParameterError("nothing to extract: no trainable layer differs (is B a copy of A?)")
        meta = lora_metadata(arch.name, dims=dims, conv_dims=conv_dims, v_prediction=bool(info_b.v_prediction),
                             title=Path(output).stem)
        write_lora(output, tensors, meta, overwrite=overwrite, inputs=[a.path, b.path])
        report.modules = len(report.ranks)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        a.close()
        b.close()


def _drop_unchanged_text(a, b, targets, names, report: ExtractReport) -> list[str]:
    text = [n for n in names if not targets[n][0].key.startswith("model.diffusion_model.")]
    biggest = 0.0
    for key in {targets[n][0].key for n in text}:
        biggest = max(biggest, float((b.get(key).float() - a.get(key).float()).abs().max()))
    if biggest > TE_MIN_DIFF:
        return names
    report.notes.append(f"text encoders left out: max |B − A| = {biggest:.3g} ≤ {TE_MIN_DIFF} (as kohya)")
    return [n for n in names if n not in set(text)]
