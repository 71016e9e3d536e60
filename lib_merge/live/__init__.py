"""Live merge: patch the parameters of a loaded torch model in place, block by block, and put
model A back bit-exactly.

The loaded model holds model A. ``LiveMerge.apply(recipe)`` plans the recipe with the same
planner as the streaming engine and, for every block whose merge changed since the last apply
(its weight, the method, a model, a parameter, a LoRA), computes the merged tensors with the engine's own
kernels (``produce_job``; the native elementwise kernel straight into the tensor)
in the recipe's output dtype, exactly as the saved file holds them, and copies them into the model
in the model's dtype and on its device — so the model holds what loading the saved file would give
it. Unchanged blocks are not touched (not even rewritten with equal values).

A's original value of a key is copied to CPU the first time the key is patched (from the LoRA
backup when a LoRA is applied); ``restore()`` writes those copies back, so the model returns to A
bit-exactly. Originals that are A's file tensor cast to the model's dtype (an upcast model) are
never copied, and with a cache limit neither are those equal to the file (both checked once, at
capture): restore re-reads them from the file. Nothing is placed on the model's device except the tensor
being written. Inputs are mapped once per session; A's bytes come from the RAM originals where
they equal the file.

How values reach the model is the ``LiveTarget``'s job: the plain target copies in place; host
adapters (``lib_merge.webui.board.host_a1111`` / ``host_forge``) write through the WebUI's own paths so
LoRA backups stay consistent. Core package: imports only torch and lib_merge.

The modules, bottom up (each imports only those above it):

- ``target``: writing through a target — ``LiveTarget``, ``WriteItem``, ``copy_into``,
  ``get_attr``, ``LiveMergeError`` (what a target's ``check`` raises), ``arch_of_file``. The
  hosts subclass it and need nothing else from here.
- ``produce``: one key's merged values into a flat tensor with the engine's kernels, the
  per-thread scratch buffers, dealing keys to threads. Stateless but for the caller's
  ``safe_inputs`` memo.
- ``changes``: planning what changed — ``replan``, ``block_parameters``, block signatures, the
  keys an apply must write, ``LiveReport``. Pure functions over plans and the caller's state.
- ``originals``: A's originals — the ``Originals`` collaborator owns the captured values, the
  cache limit and the session's mapped files (``MappedReader``; ``ModelAReader`` serves A's bytes
  from RAM), because capture, the comparison with the file, restore's re-read and the planner's
  view of A all share that state and nothing else of the session.
- ``loras``: the recipe's LoRAs — ``SessionLoras`` keeps the files open for the session (keyed by
  path, size and mtime; checked for NaN/Inf once, when opened, so a damaged file is refused before
  anything is written) and binds them with the save path's own functions; each key's signature
  then carries every patch on it, so a LoRA change rewrites only the keys that LoRA touches. The
  patched keys are produced by the engine's own LoRA step (fp32 after the method, one rounding).
- ``merge``: ``LiveMerge``, the session — locking, the worker thread, which keys it holds, and the
  roll-back to A when an apply fails — over the four above.

The seams follow the state: the originals are the only state shared across threads during a
patch, so they get an object with their lock; planning and producing keep no state of their own,
so they are functions; the session's bookkeeping (applied signatures, dirty keys, block states)
stays in one class, where roll-back can see all of it.
"""
from .changes import LiveReport, block_parameters, replan
from .merge import LiveMerge
from .originals import MappedReader
from .produce import LIVE_CHUNK
from .target import LiveMergeError, LiveTarget, WriteItem, arch_of_file, copy_into, get_attr

__all__ = [
    "LIVE_CHUNK", "LiveMerge", "LiveMergeError", "LiveReport", "LiveTarget", "MappedReader", "WriteItem",
    "arch_of_file", "block_parameters", "copy_into", "get_attr", "replan",
]
