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
    # the axis follows the values: extrapolated blocks (below A, beyond B) stay on the plot, shaded
    low, high = min(0.0, min(values)), max(1.0, max(values))
    if low < 0:
        ax.axhspan(low - 0.05, 0, color="#888", alpha=0.12, linewidth=0)
    if high > 1:
        ax.axhspan(1, high + 0.05, color="#888", alpha=0.12, linewidth=0)
    ax.set_ylim(low - 0.05, high + 0.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap(result) -> Any:
    """Per-block ‖B−A‖/‖A‖ and 1−cos, one row each with its own colour scale from 0 to the row's
    largest value and a colour bar, values written in. (A scale stretched between the row's
    extremes made 0.12 and 0.15 look like opposites.)"""
    import numpy as np
    from matplotlib.figure import Figure

    names = list(result.blocks)
    rows = [("‖B−A‖/‖A‖", [result.blocks[n].relative_difference for n in names]),
            ("1 − cos", [1 - result.blocks[n].cosine for n in names])]
    fig = Figure(figsize=(9, 3.0), dpi=90)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (label, row) in zip(axes, rows):
        data = np.array([row], dtype=float)
        top = float(np.nanmax(data)) if np.isfinite(data).any() else 0.0
        top = top if top > 0 else 1e-12
        image = ax.imshow(np.nan_to_num(data, nan=0.0), aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).ax.tick_params(labelsize=6)
        ax.set_yticks([0])
        ax.set_yticklabels([label], fontsize=8)
        for col, v in enumerate(row):
            if math.isfinite(v):
                ax.text(col, 0, f"{v:.2g}", ha="center", va="center", fontsize=5.5,
                        color="black" if v / top > 0.6 else "white")
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels(names, rotation=90, fontsize=7)
    axes[0].set_title("A vs B per block (brighter = more different; each row on its own scale from 0)", fontsize=9)
    fig.tight_layout()
    return fig
