"""Every benchmark, behind ``python -m lib_merge bench {merge,many,live,guidance,lora,ray}``.

Benchmarks are scripts that print figures (wall time against an I/O or memory floor, peak RSS), not
timed tests. The heavy contenders run in interpreters of their own (``-m lib_merge.bench.<name>``),
started in the folder that holds the package and handed absolute paths, so a benchmark runs from
any folder.
"""
from __future__ import annotations

from pathlib import Path

# where a worker interpreter starts: `-m lib_merge…` resolves from a checkout too
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

KINDS = {
    "merge": "two-model merge against the I/O floor, a whole-model baseline and sd-mecha",
    "many": "N-model dgmla and soups on full-size SD1.5 U-Nets, and the DGMLA-216 projection",
    "live": "live-merge patches of a loaded U-Net against the memory floor and a reload",
    "guidance": "per-step cost of each guidance method on the tiny U-Net",
    "ray": "many-model dgmla on the local executor vs 1, 2, … Ray workers; the DGMLA-216 projection across nodes",
    "lora": "baking a LoRA against the 2-model merge's I/O floor; extraction by full and randomized SVD",
}
