"""Live merge: patches equal the streaming engine's file, touch only changed blocks, and restore
bit-exactly after many random changes."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.arch import block_of
from lib_merge.engine import merge
from lib_merge.live import LiveMerge, LiveMergeError, LiveTarget, replan
from lib_merge.plan import open_inputs, plan_merge
from lib_merge.recipe import Recipe

from tests.hosts.common.checkpoints import PREFIX, loaded_unet, write_checkpoint

ARCH = {"sd1": "sd1", "sdxl": "sdxl"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    out = {}
    for flavour in ("sd1", "sdxl"):
        out[flavour] = [write_checkpoint(root / f"{flavour}_{i}.safetensors", flavour, seed=i) for i in range(3)]
    # a ~0.5 M-parameter variant for the long random walk
    out["sd1_small"] = [write_checkpoint(root / f"small_{i}.safetensors", "sd1", seed=i, width=8) for i in range(3)]
    return out


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
@pytest.mark.parametrize(
    "method, n_models, extra",
    [
        ("weighted_sum", 2, {"alpha": 0.5, "weights": "GRAD_V,IN04=0.3"}),
        ("add_difference", 3, {"alpha": 0.7}),
        ("slerp", 2, {"alpha": 0.35, "weights": "M00=1,OUT02=0"}),
    ],
)
def test_live_patch_equals_streaming_engine_file(files, tmp_path, flavour, method, n_models, extra):
    paths = files[flavour]
    recipe = Recipe(method, tuple(str(p) for p in paths[:n_models]), dtype="fp16", **extra)
    unet = loaded_unet(paths[0], flavour, torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), paths[0])
    report = live.apply(recipe)
    assert report.keys > 0
    result = merge(recipe, tmp_path / "out.safetensors", hash_inputs=False, hash_output=False, durable=False)
    saved = load_file(str(result.path))
    mismatched = [k for k, v in unet.state_dict().items() if not _same_bits(v, saved[PREFIX + k])]
    assert mismatched == []
    live.close()


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_one_slider_touches_only_its_block(files, flavour):
    a, b = files[flavour][:2]
    unet = loaded_unet(a, flavour, torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="GRAD_V"))
    before = {k: (v.data_ptr(), v._version, v.detach().clone()) for k, v in unet.state_dict(keep_vars=True).items()}
    report = live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="GRAD_V,IN04=0.9"))
    assert report.blocks == ["IN04"]
    touched = []
    for name, tensor in unet.state_dict(keep_vars=True).items():
        ptr, version, value = before[name]
        assert tensor.data_ptr() == ptr, name  # patched in place, storage never reallocated
        if block_of(ARCH[flavour], PREFIX + name) == "IN04":
            touched.append(not torch.equal(tensor.detach(), value))
        else:
            assert tensor._version == version, f"{name} was written although its block did not change"
            assert torch.equal(tensor.detach(), value)
    assert touched and any(touched)
    assert report.keys == len(touched)
    live.close()


def test_one_thousand_random_slider_moves_then_restore_is_bit_exact(files):
    paths = files["sd1_small"]
    a = paths[0]
    unet = loaded_unet(a, "sd1", torch.float16)
    original = _snapshot(unet)
    pointers = {k: v.data_ptr() for k, v in unet.state_dict(keep_vars=True).items()}
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    rng = random.Random(1234)
    blocks = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    weights = dict.fromkeys(blocks, 0.0)
    method, models = "weighted_sum", (str(a), str(paths[1]))
    for step in range(1000):
        roll = rng.random()
        if roll < 0.02:
            method, models = "add_difference", (str(a), str(paths[1]), str(paths[2]))
        elif roll < 0.04:
            method, models = "weighted_sum", (str(a), str(paths[rng.choice([1, 2])]))
        else:
            weights[rng.choice(blocks)] = rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
        text = ",".join(repr(weights[b]) for b in blocks)
        live.apply(Recipe(method, models, alpha=0.5, weights=text))
    assert live.is_patched
    live.restore()
    assert not live.is_patched
    for name, tensor in unet.state_dict(keep_vars=True).items():
        assert tensor.data_ptr() == pointers[name]
        assert _same_bits(tensor, original[name]), name
    live.close()


def test_replan_equals_plan_merge(files):
    paths = files["sdxl"]
    rng = random.Random(7)
    base = Recipe("weighted_sum", (str(paths[0]), str(paths[1])), alpha=0.5)
    inputs = open_inputs(base.models)
    try:
        cached = plan_merge(base, inputs)
        for _ in range(20):
            values = ",".join(str(rng.choice([0, 0.3, 1])) for _ in range(20))
            recipe = base.replace(alpha=rng.choice([0.0, 0.4]), weights=rng.choice([None, values, "GRAD_V", "M00=0"]))
            fresh = plan_merge(recipe, inputs)
            fast = replan(cached, recipe)
            assert [(j.key, j.action, j.block, j.params, j.identity, j.sources) for j in fast.jobs] == [
                (j.key, j.action, j.block, j.params, j.identity, j.sources) for j in fresh.jobs
            ]
            assert fast.block_values == fresh.block_values
    finally:
        for r in inputs:
            r.close()


def test_restore_from_file_when_cache_limit_is_zero(files):
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float16)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a, cache_limit_bytes=0)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
    assert live.original_bytes == 0  # every original equals A's file: nothing kept in RAM
    live.restore()
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())


def test_upcast_originals_are_reread_from_the_file(files):
    """A host that upcast A's fp16 file to fp32 (``--no-half``): its originals are the file cast,
    so none is copied to RAM, and restore (re-reading and casting) still gives the same bits."""
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float32)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
    assert live.original_bytes == 0
    live.restore()
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())


def test_originals_that_differ_from_the_file_are_kept(files):
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float32)
    changed = "input_blocks.1.0.in_layers.2.weight"  # e.g. another extension edited the weights
    with torch.no_grad():
        unet.get_parameter(changed).add_(1e-3)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a, cache_limit_bytes=0)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="IN01=1"))
    assert live.original_bytes == original[changed].numel() * 4
    live.restore()
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())


def test_failure_mid_apply_restores_the_model(files, tmp_path):
    a, b = files["sd1"][:2]
    bad = tmp_path / "nan.safetensors"
    tensors = load_file(str(b))
    key = PREFIX + "output_blocks.5.0.in_layers.2.weight"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    from safetensors.torch import save_file

    save_file(tensors, str(bad))
    unet = loaded_unet(a, "sd1", torch.float16)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))  # a good merge first
    with pytest.raises(LiveMergeError, match="NaN.*restored to A"):
        live.apply(Recipe("weighted_sum", (str(a), str(bad)), alpha=0.5))
    assert not live.is_patched
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())


def test_extrapolation_overflow_is_caught_although_inputs_are_finite(files, tmp_path):
    """Inputs are checked once per session, outputs only where the method could leave the inputs'
    range: α = 1.5 extrapolates, so an fp16 overflow must still stop the patch and restore A."""
    a, b = files["sd1"][:2]
    key = PREFIX + "input_blocks.4.0.in_layers.2.weight"
    big_a, big_b = tmp_path / "big_a.safetensors", tmp_path / "big_b.safetensors"
    from safetensors.torch import save_file

    for source, path, value in ((a, big_a, -40000.0), (b, big_b, 40000.0)):
        tensors = load_file(str(source))
        tensors[key] = torch.full_like(tensors[key], value)
        save_file(tensors, str(path))
    unet = loaded_unet(big_a, "sd1", torch.float16)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), big_a)
    live.apply(Recipe("weighted_sum", (str(big_a), str(big_b)), alpha=0.5))  # inputs now known finite
    assert live.is_patched
    with pytest.raises(LiveMergeError, match="NaN/Inf.*restored to A"):
        live.apply(Recipe("weighted_sum", (str(big_a), str(big_b)), alpha=1.5))
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())
    live.close()


def test_report_says_when_the_file_differs_from_the_preview(files):
    """The loaded model here is a U-Net alone: a BASE ratio that merges the text encoder is in the
    saved file only, and the report says so; BASE = 0 previews exactly what Save writes."""
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    report = live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
    assert report.skipped_keys > 0 and report.save_only_blocks == ["BASE"]
    assert report.save_only_parts == ["text encoders"]
    assert "BASE merges the text encoders into the saved file only" in report.summary()
    report = live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="BASE=0"))
    assert report.save_only_blocks == [] and "saved file only" not in report.summary()
    live.close()


def test_model_a_must_be_the_loaded_model(files):
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    with pytest.raises(LiveMergeError, match="model A must be the loaded checkpoint"):
        live.apply(Recipe("weighted_sum", (str(b), str(a)), alpha=0.5))


def test_architecture_mismatch_leaves_model_untouched(files):
    a = files["sd1"][0]
    unet = loaded_unet(a, "sd1", torch.float16)
    original = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    with pytest.raises(Exception, match="SDXL"):
        live.apply(Recipe("weighted_sum", (str(a), str(files["sdxl"][1])), alpha=0.5))
    assert all(_same_bits(v, original[k]) for k, v in unet.state_dict().items())


def test_missing_file_is_a_clear_error(files, tmp_path):
    a = files["sd1"][0]
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    with pytest.raises(Exception, match="not found"):
        live.apply(Recipe("weighted_sum", (str(a), str(tmp_path / "gone.safetensors")), alpha=0.5))
    assert not live.is_patched


def test_model_swapped_by_host_drops_state(files):
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float16)
    target = LiveTarget({PREFIX: unet})
    live = LiveMerge(target, a)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
    target.modules[PREFIX] = loaded_unet(a, "sd1", torch.float16)  # the host loaded a new object
    with pytest.raises(LiveMergeError, match="loaded model changed"):
        live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.6))
    live.restore()  # nothing to write into: the old object is gone
    assert not live.is_patched


def test_an_fp32_model_holds_exactly_the_saved_fp16_file_loaded_into_it(files, tmp_path):
    """The merge is computed in the recipe's dtype (as in the file) and cast on write, so the live
    model equals what loading the saved file would give, whatever the model's own dtype."""
    a, b = files["sd1"][:2]
    unet = loaded_unet(a, "sd1", torch.float32)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.3, weights="GRAD_V", dtype="fp16")
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(recipe)
    saved = load_file(str(merge(recipe, tmp_path / "o.safetensors", hash_inputs=False, hash_output=False, durable=False).path))
    assert [k for k, v in unet.state_dict().items() if not _same_bits(v, saved[PREFIX + k].float())] == []
    assert all(v.dtype == torch.float32 for v in unet.state_dict().values())


def test_live_merge_leaves_torch_threads_of_the_host_alone(files):
    import threading

    def fresh():
        out = []
        t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        t.start()
        t.join()
        return out[0]

    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run single-threaded; a WebUI does not
    try:
        a, b = files["sd1"][:2]
        unet = loaded_unet(a, "sd1", torch.float16)
        live = LiveMerge(LiveTarget({PREFIX: unet}), a, threads=2)
        live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
        live.restore()
        live.close()
        assert fresh() == 2
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_model_of_inference_tensors_restores_bit_exactly(files, dtype):
    # Forge loads its weights under inference_mode: originals are compared in place and copied
    # (into normal tensors) only when kept — the fp16 model keeps them, the fp32 one re-reads the file.
    a, b = files["sd1"][:2]
    with torch.inference_mode():
        unet = loaded_unet(a, "sd1", dtype)
    before = _snapshot(unet)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.6, weights="IN04=0.2"))
    assert live.original_bytes == (0 if dtype == torch.float32 else sum(t.numel() * 2 for t in before.values()))
    assert all(v is None or not v.is_inference() for v in live.originals.kept.values())
    live.restore()
    after = _snapshot(unet)
    assert all(_same_bits(before[k], after[k]) for k in before)
    live.close()


_CAPTURE_PEAK = r"""
import resource, sys, torch
from safetensors.torch import save_file
from lib_merge.live import LiveMerge, LiveTarget
path = sys.argv[1]
w16 = torch.randn(32 << 20).mul_(0.02).half()
save_file({"w": w16}, path)
with torch.inference_mode():
    w = w16.float()  # Forge --all-in-fp32: fp32 weights made from the fp16 file under inference mode
del w16

class Target(LiveTarget):
    def current(self, key):
        return w

live = LiveMerge(Target({}), path)
assert live.originals.file_match("w", w) == "cast"  # maps and reads the file, sizes the scratch buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
live.originals.capture("w")
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
assert live.originals.kept["w"] is None
print(grown)
"""


def test_capturing_an_inference_tensor_that_equals_the_file_copies_nothing(tmp_path):
    # 32 M fp32 elements (128 MB): a copy made before the comparison would raise the peak by that much.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _CAPTURE_PEAK, str(tmp_path / "w.safetensors")],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb = int(done.stdout.strip().splitlines()[-1])
    assert grown_mb < 32, f"peak memory grew {grown_mb} MB while capturing a 128 MB original equal to the file"


def test_patches_run_on_one_torch_thread_and_leave_the_hosts_setting(files):
    # With torch's two threads on the busy 2-core VM, every op waited for the descheduled one: the
    # real A1111's first SD1.5 patch took 59 s and an IN04 move up to 0.96 s; with one, 9.3 s and 16-65 ms.
    import threading

    seen = set()

    class Recording(LiveTarget):
        def write(self, items):
            seen.add(torch.get_num_threads())
            super().write(items)

    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run single-threaded; a WebUI does not
    try:
        a, b = files["sd1"][:2]
        unet = loaded_unet(a, "sd1", torch.float16)
        before = _snapshot(unet)
        live = LiveMerge(Recording({PREFIX: unet}), a)
        live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5))
        live.restore()
        live.close()
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == {1}
        assert torch.get_num_threads() == 2 and fresh == [2]
        assert all(_same_bits(before[k], v) for k, v in _snapshot(unet).items())
    finally:
        torch.set_num_threads(original)
