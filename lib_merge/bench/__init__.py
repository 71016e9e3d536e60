"""Every benchmark, behind ``python -m lib_merge bench {merge,many,live,guidance,lora,ray}``.

Benchmarks are scripts that print figures (wall time against an I/O or memory floor, peak RSS), not
timed tests. The heavy contenders run in interpreters of their own (``-m lib_merge.bench.<name>``),
started in the folder that holds the package and handed absolute paths, so a benchmark runs from
any folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def own_peak_rss() -> int | None:
    """This process's peak RSS since its program started (VmHWM, Linux), or None where unknown.

    Not ``ru_maxrss``: when a process execs, Linux folds the high-water mark of the address space
    it replaces into the process's maxrss, and after Popen's fork or vfork that address space is
    the parent's. So ``wait4`` reported every worker at least as large as the benchmark process
    that started it (0.55 GB for a floor that holds 32 MB, in a run that wrote its inputs first)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_result(result: dict) -> str:
    """A worker's last stdout line: its result and its own peak RSS."""
    return json.dumps({**result, "peak_rss": own_peak_rss()})


def peak_rss_of(result: dict, usage: Any) -> int:
    """A finished worker's peak RSS: what it measured itself, else ``wait4``'s (an upper bound)."""
    own = result.pop("peak_rss", None)
    return int(own) if own else usage.ru_maxrss * 1024  # ru_maxrss is in kB on Linux
