"""N-model merges through the engine: the stated memory bound (formula, the --max-memory gate,
and a measured peak against the declared working set), results independent of threads and
chunking, and recipes that embed and re-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import lib_merge.engine as engine
import lib_merge.engine.produce as engine_produce
import lib_merge.engine.run as engine_run
from lib_merge.cli import main
from lib_merge.errors import BadParameterError, MemoryBudgetError
from lib_merge.io.reader import open_checkpoint
from lib_merge.many import job_bytes, parse_size, plan_memory, stream_chunk
from lib_merge.methods import get_method
from lib_merge.methods.task_vector import SCRATCH_BYTES
from lib_merge.plan import open_inputs, plan_merge
from lib_merge.recipe import METADATA_KEY, Recipe

from _slim import write_slim_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("many")
    return [str(write_slim_unet(folder / f"m{i}.safetensors", model=i)) for i in range(4)]


def merged(recipe: Recipe, out: Path, **kwargs) -> bytes:
    engine.merge(recipe, out, hash_inputs=False, hash_output=False, durable=False, overwrite=True, **kwargs)
    return out.read_bytes()


def test_results_do_not_depend_on_threads_or_chunks(models, tmp_path, monkeypatch):
    for method in ("dgmla", "dare", "ties"):
        recipe = Recipe(method, tuple(models), seed=3)
        one = merged(recipe, tmp_path / "one.safetensors", threads=1)
        three = merged(recipe, tmp_path / "three.safetensors", threads=3)
        assert one == three, method
    recipe = Recipe("dare", tuple(models), seed=3, params={"vote": "count"})
    default = merged(recipe, tmp_path / "a.safetensors", threads=2)
    monkeypatch.setattr(engine_produce, "CHUNK_ELEMENTS", 4096 + 512)  # chunks not aligned with the RNG blocks
    assert merged(recipe, tmp_path / "b.safetensors", threads=2) == default


def test_plan_states_the_bound_and_the_formula(models):
    inputs = open_inputs(models)
    try:
        plan = plan_merge(Recipe("dgmla", tuple(models)), inputs)
        big = max(plan.jobs, key=lambda j: torch.Size(j.shape).numel())
        n = torch.Size(big.shape).numel()
        copies = get_method("dgmla").fn.working_copies(4)
        assert copies == 3 + 8  # P = 3 task vectors + DELLA's sort buffers and their allocator slack
        assert job_bytes(plan, big) == int(copies * 4 * n) + 2 * 2 * n + SCRATCH_BYTES
        memory = plan_memory(plan, threads=2, budget=None)
        assert memory.largest_key == big.key and memory.largest_bytes == job_bytes(plan, big)
        sizes = sorted((job_bytes(plan, j) for j in plan.jobs), reverse=True)
        assert memory.bound == sizes[0] + sizes[1]
        text = memory.describe(plan)
        assert "dgmla over 4 models" in text and "working set ≤" in text and big.key in text
        capped = plan_memory(plan, threads=8, budget=memory.largest_bytes)
        assert capped.bound == memory.largest_bytes
        with pytest.raises(MemoryBudgetError, match=big.key):
            plan_memory(plan, threads=1, budget=memory.largest_bytes - 1)
        soup = plan_merge(Recipe("soup", tuple(models)), inputs)
        assert job_bytes(soup, big) == 4 * 2 * n + 22 * stream_chunk(4) * 4
    finally:
        for r in inputs:
            r.close()


def test_max_memory_gate_keeps_keys_in_flight_under_the_cap(models, tmp_path, monkeypatch):
    inputs = open_inputs(models)
    plan = plan_merge(Recipe("tgmd", tuple(models)), inputs)
    cap = plan_memory(plan, 1, None).largest_bytes * 2
    for r in inputs:
        r.close()
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "keys": 0, "most_keys": 0}
    produce = engine_run.produce_job

    def tracking(plan, job, counters=None):
        need = job_bytes(plan, job)
        with lock:
            state["now"] += need
            state["keys"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["most_keys"] = max(state["most_keys"], state["keys"])
        try:
            yield from produce(plan, job, counters)
        finally:
            with lock:
                state["now"] -= need
                state["keys"] -= 1

    monkeypatch.setattr(engine_run, "produce_job", tracking)
    lines = []
    engine.merge(Recipe("tgmd", tuple(models)), tmp_path / "out.safetensors", threads=4, max_memory=cap,
                 hash_inputs=False, on_plan=lines.append)
    assert state["peak"] <= cap and state["most_keys"] >= 2
    assert lines and "capped by --max-memory" in lines[0]
    with pytest.raises(MemoryBudgetError):
        engine.merge(Recipe("tgmd", tuple(models)), tmp_path / "x.safetensors", max_memory=4096, hash_inputs=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_measured_peak_stays_within_the_declared_working_set():
    """One big key per method, each in a forked child of one fresh interpreter: the peak RSS
    growth while the method runs must stay under copies(N) × 4 bytes × n plus the chunk scratch
    (the inputs are already resident, as mapped input files would be)."""
    script = textwrap.dedent("""
        import json, os, resource, torch
        from lib_merge.methods import KeyContext, get_method
        from lib_merge.methods.task_vector import SCRATCH_BYTES
        torch.set_num_threads(1)
        n, count = 2_000_000, 5
        g = torch.Generator().manual_seed(0)
        models = [torch.randn(n, generator=g).half() for _ in range(count)]
        for name in ("dgmla", "tgmd", "ties", "model_stock"):
            spec = get_method(name)
            params = spec.resolve_params({})
            spec.fn(*[m[:1000] for m in models], ctx=KeyContext("warm"), **params)  # kernels and allocator warm
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                spec.fn(*models, ctx=KeyContext("k", seed=1), **params)
                after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                os.write(write, json.dumps([name, after - before, spec.fn.working_copies(count) * 4 * n + SCRATCH_BYTES]).encode())
                os._exit(0)
            os.close(write)
            os.waitpid(pid, 0)
            print(os.read(read, 1000).decode())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(rows) == 4
    for name, grew, declared in rows:
        assert grew <= declared, (name, grew, declared)


def test_parse_size():
    assert parse_size("24G") == 24 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("512m") == 512 << 20
    assert parse_size(None) is None
    with pytest.raises(BadParameterError):
        parse_size("lots")
    with pytest.raises(BadParameterError, match="unit"):
        parse_size("64")


def test_recipe_embeds_hashes_and_reruns(models, tmp_path, capsys):
    out = tmp_path / "dgmla.safetensors"
    assert main([*_args(models), "-o", str(out), "--method", "dgmla", "--seed", "9",
                 "--param", "della_eps=-0.2", "--alpha", "0.8", "--max-memory", "2G"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan: dgmla over 4 models") and "capped by --max-memory 2.00 GiB" in printed
    with open_checkpoint(out) as reader:
        recipe = json.loads(reader.metadata[METADATA_KEY])
    assert recipe["method"] == "dgmla" and recipe["params"] == {"della_eps": "-0.2"} and recipe["seed"] == 9
    assert len(recipe["model_hashes"]) == 4 and all(len(h) == 64 for h in recipe["model_hashes"])
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--recipe", str(out), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_model_list_from_a_file(models, tmp_path):
    listing = tmp_path / "models.txt"
    listing.write_text("\n".join(models) + "\n")
    out = tmp_path / "soup.safetensors"
    assert main(["merge", f"@{listing}", "-o", str(out), "--method", "ties_soup", "--no-hash"]) == 0
    assert out.exists()


def _args(models: list[str]) -> list[str]:
    return ["merge", *models]


def test_rerun_warns_when_an_input_is_not_the_recorded_file(models, tmp_path):
    recorded = ("0" * 64,) + ("",) * 3
    warnings: list[str] = []
    engine.merge(Recipe("ties_soup", tuple(models), model_hashes=recorded), tmp_path / "o.safetensors",
                 warn=warnings.append)
    assert len(warnings) == 1 and "A (m0.safetensors) is not the file the recipe recorded" in warnings[0]


# Each method runs one big fp16 key through the engine's own key path (produce_job, the chunks
# consumed as a writer would), in a forked child of a process that ran the same key once (so
# one-time costs — kernels, per-thread chunk buffers — are paid): the peak RSS growth plus the
# inputs the formula counts as mapped (already resident here) is set against job_bytes, the
# per-key figure behind the printed 'working set ≤' bound. Prints [name, used, bound] per row.
BOUND_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, types, torch
    from lib_merge.engine.produce import produce_job
    from lib_merge.io.reader import TensorDictReader
    from lib_merge.many import job_bytes
    from lib_merge.methods import all_methods, get_method
    from lib_merge.plan import KeyJob
    torch.set_num_threads(1)
    runs, settle = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    n = 2_000_000
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    models = [base.half()] + [(base + 0.05 * torch.randn(n, generator=g)).half() for _ in range(3)]
    def setup(spec, tensors, count, given):
        readers = [TensorDictReader(f"m{i}", {"k": t}) for i, t in enumerate(tensors[:count])]
        recipe = types.SimpleNamespace(seed=1, models=tuple(f"m{i}" for i in range(count)))
        plan = types.SimpleNamespace(recipe=recipe, method=spec, inputs=readers)
        params = spec.resolve_params(given)
        if hasattr(spec.fn, "prepass"):  # the planner's whole-model values (cosine: a similarity range)
            params["sims_range"] = (0.5, 1.0)
        job = KeyJob("k", "merge", "BASE", (tensors[0].numel(),), torch.float16, params, tuple(range(count)))
        return plan, job
    if runs is None:
        runs = [[spec.name, {}] for spec in all_methods()]
    for name, given in runs:
        spec = get_method(name)
        count = max(spec.min_models, 3) if spec.max_models is None else spec.min_models
        plan, job = setup(spec, models, count, given)
        for _ in produce_job(plan, job):  # kernels, thread buffers and the allocator warm
            pass
        lazy = getattr(spec.fn, "lazy_inputs", False)
        mapped = (2 if lazy else count) * 2 * n
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            if settle:  # the child's first allocation costs a few MiB once, whatever follows
                torch.ones(16).add_(1)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            for _ in produce_job(plan, job):
                pass
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            os.write(write, json.dumps([spec.name, after - before + mapped, job_bytes(plan, job)]).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        print(os.read(read, 1000).decode())
""")


def measure_bounds(runs: list | None, *, strict: bool) -> list[tuple[str, int, int]]:
    """[name, used, bound] per method run. ``strict``: glibc maps every block ≥ 64 KiB afresh
    and unmaps it when freed — by default it raises that threshold up to 32 MiB as blocks are
    freed, so the warm run's freed heap is reused unseen and a method's temporaries below 32 MiB
    are not measured at all — and the child's one-off first-allocation cost is paid before the
    start figure is taken."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if strict:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)
    done = subprocess.run([sys.executable, "-c", BOUND_SCRIPT, json.dumps(runs), json.dumps(strict)], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    rows = [tuple(json.loads(line)) for line in done.stdout.strip().splitlines()]
    for name, used, bound in rows:
        print(f"{name:20s} used {used / 2**20:6.1f} MiB, bound {bound / 2**20:6.1f} MiB")
    return rows  # type: ignore[return-value]


def test_every_method_stays_within_the_bound_the_plan_prints():
    rows = measure_bounds(None, strict=False)
    assert {"slerp", "bislerp", "ties", "della", "geometric_median", "train_difference", "karcher",
            "add_perpendicular", "multislerp", "sce"} <= {r[0] for r in rows}
    over = [(name, used, bound) for name, used, bound in rows if used > bound]
    assert not over, over


def test_streamed_methods_bounds_hold_and_are_tight():
    """add_perpendicular, multislerp and sce (with and without its top-k selection), measured
    strictly: within the printed bound, and the bound under twice the use (not inflated to pass)."""
    runs = [["add_perpendicular", {}], ["multislerp", {}], ["multislerp", {"use_base": "true"}], ["sce", {}],
            ["sce", {"select_topk": "0.5"}], ["sce", {"select_topk": "0.9"}]]
    rows = measure_bounds(runs, strict=True)
    assert len(rows) == len(runs)
    for name, used, bound in rows:
        assert used <= bound <= 2 * used, (name, used, bound)


def test_every_method_within_its_bound_measured_strictly():
    """Every registered method, measured strictly (see ``measure_bounds``), stays within the
    bound the plan prints — the elementwise task-vector methods too, whose chunk path holds the
    stack, draws, signs and masks (ties_soup used 1.01× the plain elementwise bound before it
    declared them)."""
    from lib_merge.methods import all_methods

    rows = measure_bounds([[spec.name, {}] for spec in all_methods()], strict=True)
    assert len(rows) == len(all_methods())
    over = [(name, used, bound) for name, used, bound in rows if used > bound]
    assert not over, over


def test_karcher_declares_its_working_set_and_reads_through_handles(models, tmp_path):
    """The plan's bound for karcher is its declared N directions + 3 fp32 vectors, and the
    engine's handle path gives exactly the plain-tensor result."""
    inputs = open_inputs(models)
    try:
        plan = plan_merge(Recipe("karcher", tuple(models)), inputs)
        big = max(plan.jobs, key=lambda j: torch.Size(j.shape).numel())
        n = torch.Size(big.shape).numel()
        assert job_bytes(plan, big) == (4 + 3) * 4 * n + 2 * 2 * n + SCRATCH_BYTES
        assert "N unit directions" in plan_memory(plan, threads=1, budget=None).describe(plan)
        plain = get_method("karcher").fn(*[r.get(big.key).float() for r in inputs], ctx=None,
                                         **plan.method.resolve_params({}))
    finally:
        for r in inputs:
            r.close()
    out = tmp_path / "k.safetensors"
    engine.merge(Recipe("karcher", tuple(models), dtype="fp32"), out, hash_inputs=False, hash_output=False, durable=False)
    with open_checkpoint(out) as reader:
        assert torch.equal(reader.get(big.key), plain)
