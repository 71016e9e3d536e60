"""The board's two figures: the block-weight curve and the A-vs-B per-block heatmap. Plain
matplotlib ``Figure``s built without pyplot, so handlers on several gradio worker threads can draw
concurrently; kept free of gradio and of the board so they can be drawn and tested on their own."""
from __future__ import annotations

import math
from typing import Any, Sequence


def block_curve(blocks: Sequence[str], values: Sequence[float]):
    """Block-weight curve (matplotlib Figure; no pyplot, so it is thread-safe)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), dpi=90)
    ax = fig.add_subplot(111)
    xs = list(range(len(blocks)))
    ax.plot(xs, values, marker="o", color="#e07b39")
    ax.axhline(0, color="#888", linewidth=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels(blocks, rotation=90, fontsize=7)
    ax.set_ylabel("α (B's share)")
    low, high = min(0.0, min(values)), max(1.0, max(values))
    ax.set_ylim(low - 0.05, high + 0.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap(result) -> Any:
    """Per-block ‖B−A‖/‖A‖ and 1−cos as a two-row heatmap with the values written in."""
    import numpy as np
    from matplotlib.figure import Figure

    names = list(result.blocks)
    rel = [result.blocks[n].relative_difference for n in names]
    cos = [1 - result.blocks[n].cosine for n in names]
    data = np.array([rel, cos], dtype=float)
    fig = Figure(figsize=(9, 2.2), dpi=90)
    ax = fig.add_subplot(111)
    shown = np.nan_to_num(data / np.nanmax(data, axis=1, keepdims=True).clip(min=1e-12), nan=0.0)
    ax.imshow(shown, aspect="auto", cmap="magma")
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["‖B−A‖/‖A‖", "1 − cos"], fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    for row in range(2):
        for col in range(len(names)):
            v = data[row, col]
            if math.isfinite(v):
                ax.text(col, row, f"{v:.2g}", ha="center", va="center", fontsize=5.5,
                        color="white" if shown[row, col] < 0.6 else "black")
    ax.set_title("A vs B per block (brighter = more different)", fontsize=9)
    fig.tight_layout()
    return fig
