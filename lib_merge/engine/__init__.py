"""The merge engine: a plan runs one way, plan → method → writer, key by key, and no key's
tensors outlive its write — peak memory is bounded by the keys in flight, never the model size.

The modules follow that flow, and their imports never turn back:

    run      merge() / execute(): the driver of one output file — request checks, input hashes,
             then every key's chunks from ``produce`` to the writer on the ``pool``, then finish
             or stop (through ``output``)
    output   the output file and its resume journal: open (fresh or resumed), stop (partial
             file kept for ``merge --resume`` or removed), the messages that say which
    executor where the keys run (the seam): ``LocalExecutor`` hands them to ``pool``; the
             worker side of a remote run (``ReservedFile``, ``merge_shard``, ``open_plan``)
    ray_executor  keys as shards, one Ray task each (Ray imported only there, only when asked)
    executors     ``make_executor(name)`` for the command line
    pool     keys side by side: thread counts, single-threaded torch per worker, admission by
             the memory budget; knows nothing of merging (the soup runs its keys on it too)
    produce  one key → flat output chunks: read the sources, apply the method (elementwise
             methods streamed through per-thread chunk buffers), copy keys checked
    finite   the NaN/Inf check and the messages that name the culprit input

run → executor, output, pool, produce; executor → pool, produce; ray_executor → executor,
output, pool; produce → finite; output, pool and finite import nothing else of the engine. ``merge``, ``execute`` and ``MergeResult`` are the public API (the CLI, the WebUI
and the docs call them as ``lib_merge.engine.merge``); the rest is imported from its module.
"""
from .run import MergeResult, ProgressFn, execute, merge

__all__ = ["MergeResult", "ProgressFn", "execute", "merge"]
