"""supermerger's cosineA/cosineB: the planner's whole-model similarity pass and the per-key merge
against a re-derivation of supermerger's loop (numpy percentiles and deletes, nn.CosineSimilarity)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lib_merge.cli import main
from lib_merge.live import replan
from lib_merge.plan import open_inputs, plan_merge
from lib_merge.recipe import Recipe
from tests.files import load_tensors


def _reference(a_sd, b_sd, alpha, favour_a):
    """supermerger's precosine + cosine (use-lerp form) written out for fp32 tensors."""
    sim = torch.nn.CosineSimilarity(dim=0)
    sims = np.array([], dtype=np.float64)
    for key in a_sd:
        if "first_stage_model" in key or "model" not in key or key not in b_sd or a_sd[key].dim() == 0:
            continue
        x, y = a_sd[key].to(torch.float32), b_sd[key].to(torch.float32)
        if favour_a:
            s = sim(torch.nn.functional.normalize(x, p=2, dim=0), torch.nn.functional.normalize(y, p=2, dim=0))
        else:
            s = (sim(x, y) + torch.dot(x.view(-1), y.view(-1)) / (torch.norm(x) * torch.norm(y))) / 2.0
        sims = np.append(sims, s.numpy())
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    out = {}
    for key, value in a_sd.items():
        x, y = value.to(torch.float32), b_sd[key].to(torch.float32)
        if not value.is_floating_point():
            out[key] = value  # copied from A by both
            continue
        if "first_stage_model" in key:
            out[key] = x
            continue
        if favour_a:
            xn, yn = torch.nn.functional.normalize(x, p=2, dim=0), torch.nn.functional.normalize(y, p=2, dim=0)
        else:
            xn, yn = x, y
        combined = (sim(xn, yn) + torch.dot(xn.view(-1), yn.view(-1)) / (torch.norm(xn) * torch.norm(yn))) / 2.0
        k = (combined - float(sims.min())) / (float(sims.max()) - float(sims.min()))
        k = (k - (abs(alpha) if favour_a else alpha)).clip(min=0, max=1.0)
        out[key] = torch.lerp(y, x, k)
    return out


@pytest.mark.parametrize("method, favour_a, alpha", [("cosine_a", True, -0.2), ("cosine_b", False, 0.3)])
def test_cosine_matches_supermergers_loop(models, out_dir, method, favour_a, alpha):
    out = out_dir / f"{method}.safetensors"
    assert main(["merge", str(models.sd1_a), str(models.sd1_b), "--method", method, "--alpha", str(alpha),
                 "--dtype", "fp32", "-o", str(out), "--no-hash"]) == 0
    a, b, got = load_tensors(models.sd1_a), load_tensors(models.sd1_b), load_tensors(out)
    want = _reference(a, b, alpha, favour_a)
    mixed = 0
    for key, value in want.items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)
        mixed += not torch.equal(got[key], a[key].float())
    assert mixed > len(want) // 2  # most keys really take part of B
    vae = next(k for k in want if k.startswith("first_stage_model."))
    assert torch.equal(got[vae], a[vae].float())


@pytest.mark.parametrize("method", ["cosine_a", "cosine_b"])
def test_a_zero_tensor_gives_a_finite_key_not_nan(models, tmp_path, method):
    """A key that is all zeros in A (or in both) has no direction: supermerger's whole-tensor
    cosine is 0/0 = NaN there and the merge was refused as non-finite; it now counts as
    unrelated (similarity 0), and a key zero in both models stays zero."""
    from safetensors.torch import save_file

    a, b = load_tensors(models.sd1_a), load_tensors(models.sd1_b)
    biases = [k for k in a if k.startswith("model.diffusion_model.") and k.endswith(".bias") and a[k].dim() == 1]
    zero_both, zero_a = biases[0], biases[1]
    a[zero_both], b[zero_both] = torch.zeros_like(a[zero_both]), torch.zeros_like(b[zero_both])
    a[zero_a] = torch.zeros_like(a[zero_a])
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    assert main(["merge", str(pa), str(pb), "--method", method, "--alpha", "0.1", "--dtype", "fp32",
                 "-o", str(out), "--no-hash"]) == 0
    got = load_tensors(out)
    assert all(torch.isfinite(t).all() for t in got.values() if t.is_floating_point())
    assert torch.equal(got[zero_both], torch.zeros_like(got[zero_both]))
    k = 1 - got[zero_a] / b[zero_a].float()  # out = B + k·(A − B) = (1 − k)·B where A = 0
    assert torch.allclose(k, k[0].expand_as(k), atol=1e-6) and 0.0 <= float(k[0]) <= 1.0


def test_the_range_survives_the_live_replan(models):
    inputs = open_inputs([str(models.sd1_a), str(models.sd1_b)])
    try:
        plan = plan_merge(Recipe("cosine_b", (str(models.sd1_a), str(models.sd1_b)), alpha=0.1), inputs)
        ranges = {job.params["sims_range"] for job in plan.jobs if job.action == "merge"}
        assert len(ranges) == 1 and ranges.pop()[0] < 1
        moved = replan(plan, plan.recipe.replace(alpha=0.6, weights="IN04=0.9"))
        assert all(j.params["sims_range"] == plan.jobs[i].params["sims_range"]
                   for i, j in enumerate(moved.jobs) if j.action == "merge")
        assert {j.params["alpha"] for j in moved.jobs if j.action == "merge"} == {0.6, 0.9}
    finally:
        for reader in inputs:
            reader.close()


def test_cosine_with_a_virtual_b_is_one_error(models, out_dir, capsys):
    out = out_dir / "x.safetensors"
    assert main(["merge", str(models.sd1_a), "noise(seed=1)", "--method", "cosine_a", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "checkpoint file" in err[0]
    assert not out.exists()


def _plan_jobs(recipe: Recipe) -> list:
    inputs = open_inputs(list(recipe.models))
    try:
        plan = plan_merge(recipe, inputs)
        return [(j.key, j.action, j.sources, sorted(j.params.items())) for j in plan.jobs]
    finally:
        for reader in inputs:
            reader.close()


def test_planning_the_same_pair_again_reads_neither_model(models, monkeypatch):
    """The pre-pass reads every key of A and B once; a second plan of the same files (the live
    preview's re-plan, a Ray worker's plan) takes the remembered range — until a file changes."""
    from lib_merge.io.reader import SafetensorsReader
    from lib_merge.methods.prepass_cache import CACHE

    CACHE.clear()
    reads: list[str] = []
    get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, key: reads.append(key) or get(self, key))
    a, b = str(models.sd1_a), str(models.sd1_b)
    recipe = Recipe("cosine_b", (a, b), alpha=0.2)
    first = _plan_jobs(recipe)
    assert len(reads) > 100  # every 'model' key of both files
    read_once = len(reads)
    assert _plan_jobs(recipe) == first and len(reads) == read_once
    assert _plan_jobs(recipe.replace(alpha=0.7)) != first and len(reads) == read_once  # α is not the pass's
    # cosine_a's pass is another one (column-normalised tensors): its own entry
    _plan_jobs(Recipe("cosine_a", (a, b)))
    assert len(reads) == 2 * read_once
    # a touched B (new mtime) is read again, and gives the same range
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert _plan_jobs(recipe) == first and len(reads) == 3 * read_once


def test_a_changed_file_is_not_taken_for_the_remembered_one(models):
    """B rewritten with other weights (same name, size): the range is the new file's."""
    from lib_merge.methods.prepass_cache import CACHE

    CACHE.clear()
    a, b = str(models.sd1_a), str(models.sd1_b)
    before = _plan_jobs(Recipe("cosine_b", (a, b)))
    changed = models.derive(models.sd1_c, "other.safetensors")
    os.replace(changed, b)
    after = _plan_jobs(Recipe("cosine_b", (a, b)))
    assert after != before
    assert after == _plan_jobs(Recipe("cosine_b", (a, str(models.sd1_c))))


def test_the_cache_keeps_the_last_entries():
    from lib_merge.methods.prepass_cache import PrepassCache

    cache = PrepassCache(size=3)
    for i in range(3):
        cache.put(i, {"v": i})
    assert cache.get(0) == {"v": 0}  # now the most recent
    cache.put(3, {"v": 3})
    assert cache.get(1) is None and cache.get(0) == {"v": 0} and cache.get(2) == {"v": 2}
    value = cache.get(3)
    value["v"] = 99  # a caller's copy
    assert cache.get(3) == {"v": 3}
