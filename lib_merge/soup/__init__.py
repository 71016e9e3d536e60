"""Incremental soups (Diffusion Soup, arXiv 2406.08431): a pot holds Σ wᵢθᵢ per key in fp64
plus the ingredient list, so adding, removing or reweighting one model reads only that model
(and the pot), never the other ingredients; ``export`` writes the weighted average.

Why fp64: with fp16/bf16/fp32 ingredients every wᵢθᵢ is exact or rounded at 2⁻⁵³, so any
sequence of adds and removes leaves the sum within ~1e-15 (relative) of the direct sum, far below
fp16's 2⁻¹¹ — the export equals the direct weighted average within fp16 rounding. The price: a
pot is 8 bytes per parameter (4× an fp16 model), and each change reads and rewrites it.

    pot      ``Pot``: the folder's API — init, add, remove, reweight, verify, describe, export
    store    the files on disk: manifest, checksums, the atomic commit, the lock
    sums     the layout a pot holds and the numeric step of a change (old + Σ coef·θ)
    export   a pot → a checkpoint (the weighted average)

pot → export, sums, store; export and sums → store. Keys run on the engine's pool
(``lib_merge.engine.pool``). ``Pot`` and ``Ingredient`` are the public API.
"""
__all__ = ["Ingredient", "Pot"]


def __getattr__(name: str):
    # lazily, so the command line (lib_merge.soup.cli) parses its arguments without importing torch
    if name == "Pot":
        from .pot import Pot

        return Pot
    if name == "Ingredient":
        from .store import Ingredient

        return Ingredient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
