"""The output file of a merge and its resume journal, from opening to a stop.

A merge writes under a temporary name and renames at the end, so a failure can never leave a
half-written file under the final name. Long runs also keep a resume journal beside it: on a
failure or a cancel the partial file and the journal are then kept, and ``merge --resume``
continues from them; without a journal the partial file is removed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OutputPathError, ResumeError
from ..inputs import parse_model_ref
from ..io.writer import SafetensorsWriter, plan_layout, temp_path_for
from ..plan import MergePlan
from ..recipe import Recipe
from ..resume import Journal, journal_path


def check_output_name(out_path: Path) -> None:
    if out_path.suffix.lower() not in (".safetensors", ".sft"):
        # A1111 and our own reader open .ckpt/.pt with torch.load: safetensors bytes under such a
        # name would be a file that nothing can load
        raise OutputPathError(f"{out_path}: merged models are written as safetensors; name the output *.safetensors")


def clear_stale_journal(out_path: Path, *, resume: bool, overwrite: bool) -> None:
    """A journal left by an interrupted run is progress the user may want: a plain re-run
    refuses to throw it away unless told to overwrite."""
    stale = journal_path(out_path)
    if resume or not stale.exists():
        return
    if not overwrite:
        raise ResumeError(
            f"{out_path}: an interrupted merge of this output can be continued — add --resume; "
            f"or pass --overwrite (or delete {stale.name}) to start over"
        )
    try:
        stale.unlink()
    except OSError as exc:
        raise OutputPathError(f"{stale}: cannot remove the old resume file ({exc.strerror}); delete it by hand") from None


def input_files(plan: MergePlan) -> list[Path]:
    """Every file the recipe reads — models, the baked VAE, the LoRAs — so that no output name,
    even with --overwrite, can replace one of them."""
    files = [Path(r.path) for r in plan.readers]
    if plan.recipe.vae:
        files.append(Path(plan.recipe.vae))
    files.extend(Path(lora["path"]) for lora in plan.recipe.loras)
    return files


def open_output(
    plan: MergePlan,
    out_path: Path,
    planned: list[tuple[str, tuple[int, ...], Any]],
    metadata: dict[str, str],
    settings: dict[str, Any] | None,
    *,
    resume: bool,
    overwrite: bool,
    durable: bool,
    hash_output: bool = False,
) -> tuple[SafetensorsWriter, Journal | None, set[str]]:
    """The output's writer, its journal (only with ``settings``, the run's recorded options) and
    the keys a resumed run keeps. The old journal is read before the partial file is touched;
    the new one is opened once the writer knows whether the partial file could be reused."""
    log: Journal | None = None
    done: set[str] = set()
    if settings is not None:
        _, header = plan_layout(planned, metadata, out_path)
        log = Journal(out_path, header, [r.path for r in plan.readers], _absolute_recipe(plan.recipe), settings)
        if resume:
            done = log.completed()
    writer = SafetensorsWriter(
        out_path,
        planned,
        metadata,
        inputs=input_files(plan),
        overwrite=overwrite,
        durable=durable,
        resume=resume,
        hash_output=hash_output,
    )
    if log is not None:
        if not writer.resumed:
            done = set()  # no usable partial file: everything is redone
        writer.mark_written(done)
        try:
            log.open(keep=resume and writer.resumed)
        except BaseException:
            if writer.resumed:
                writer.keep_partial()  # the earlier resume file still describes it
            else:
                writer.abort()  # no resume file, so nothing could continue the partial output
            raise
    return writer, log, done


def stop(writer: SafetensorsWriter, log: Journal | None) -> None:
    """After a failure or a cancel: without a resume file remove the partial output; with one,
    make what was written durable and keep both for ``merge --resume``."""
    if log is None:
        writer.abort()
        return
    try:
        log.flush(writer.sync)
    except (OSError, OutputPathError):
        pass  # the last batch is redone on resume
    writer.keep_partial()
    log.close()


def stopped_message(out_path: Path, log: Journal | None, how: str) -> str:
    if log is None:
        return f"{out_path}: merge {how}; no file was written"
    return (
        f"{out_path}: merge {how}; progress kept in {temp_path_for(out_path).name} — "
        f"`python -m lib_merge merge --resume -o {out_path}` continues it"
    )


def _absolute_recipe(recipe: Recipe) -> dict:
    """The recipe as the journal records it: paths made absolute, so `merge --resume` run from
    another folder still finds the inputs."""
    models = [m if not isinstance(parse_model_ref(m), str) else str(Path(m).resolve()) for m in recipe.models]
    return recipe.replace(models=tuple(models), vae=str(Path(recipe.vae).resolve()) if recipe.vae else None).to_dict()
