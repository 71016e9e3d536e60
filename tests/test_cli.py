"""The command line (`python -m lib_merge`), driven through ``lib_merge.cli.main``: output of
merge / inspect / methods, and the one-line ``error: …`` (exit status 2) for every bad input."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.cli import main
from lib_merge.methods import all_methods
from lib_merge.presets import PRESETS

from tests.files import leftovers, load_tensors, read_metadata


def run_ok(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    return captured.out


def run_error(capsys, *argv: str, code: int = 2) -> str:
    """Exit status 2 (or ``code``) and exactly one line on stderr, ``error: …``; returns that line."""
    got = main(list(argv))
    captured = capsys.readouterr()
    assert got == code, (got, captured.out, captured.err)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# ---- merge ---------------------------------------------------------------------------------------


def test_merge_prints_output_and_hashes(models, out_dir, capsys):
    out = out_dir / "cli.safetensors"
    stdout = run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out),
                    "--weights", "GRAD_V", "--alpha", "0.5", "--threads", "2")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"wrote {out}" in stdout
    assert re.search(rf"^sha256 {digest}$", stdout, re.M), stdout
    assert re.search(rf"^short hash \[{digest[:10]}\]$", stdout, re.M), stdout
    meta = read_metadata(out)
    models_meta = json.loads(meta["sd_merge_models"])
    for p in (models.sd1_a, models.sd1_b):
        assert hashlib.sha256(p.read_bytes()).hexdigest() in models_meta
    recipe = json.loads(meta["lib_merge_recipe"])
    assert recipe["weights"] == "GRAD_V" and recipe["method"] == "weighted_sum" and recipe["alpha"] == 0.5


def test_merge_with_method_params_seed_and_dtype(models, out_dir, capsys):
    out = out_dir / "soup.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), str(models.sd1_c), "-o", str(out),
           "--method", "soup", "--param", "model_weights=2,1,1", "--dtype", "fp32", "--seed", "9", "--no-hash")
    A, B, C = (load_tensors(p) for p in (models.sd1_a, models.sd1_b, models.sd1_c))
    got = load_tensors(out)
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    assert got[key].dtype == torch.float32
    torch.testing.assert_close(got[key], 0.5 * A[key].float() + 0.25 * B[key].float() + 0.25 * C[key].float())
    recipe = json.loads(read_metadata(out)["lib_merge_recipe"])
    assert recipe["params"] == {"model_weights": "2,1,1"} and recipe["seed"] == 9 and recipe["dtype"] == "fp32"
    assert "model_hashes" not in recipe  # --no-hash


def test_virtual_inputs_on_the_command_line(models, out_dir, capsys):
    out = out_dir / "noisy.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), "noise(seed=2,scale=0.1)", "-o", str(out), "--method", "slerp",
           "--alpha", "0.2")
    assert json.loads(read_metadata(out)["lib_merge_recipe"])["models"][1] == "noise(seed=2,scale=0.1)"


def test_recipe_overrides_on_the_command_line(models, out_dir, capsys):
    first = out_dir / "first.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(first), "--alpha", "0.2")
    second = out_dir / "second.safetensors"
    run_ok(capsys, "merge", "--recipe", str(first), "-o", str(second), "--alpha", "0.8")
    A, B, got = load_tensors(models.sd1_a), load_tensors(models.sd1_b), load_tensors(second)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[key], torch.lerp(A[key].float(), B[key].float(), 0.8).half())
    assert json.loads(read_metadata(second)["lib_merge_recipe"])["alpha"] == 0.8


def _vae_file(models, path: Path, *, prefix: str = "", drop: int = 0, source: Path | None = None,
              metadata: dict | None = None) -> Path:
    """A VAE file made from model B's VAE (or ``source``'s; halved, in fp32), keys with or without
    the checkpoint prefix."""
    from safetensors.torch import save_file

    vae = {k[len("first_stage_model."):]: v.float() * 0.5 for k, v in load_tensors(source or models.sd1_b).items()
           if k.startswith("first_stage_model.")}
    for key in sorted(vae)[:drop]:
        del vae[key]
    save_file({prefix + k: v.contiguous() for k, v in vae.items()}, str(path), metadata=metadata)
    return path


def test_vae_of_another_latent_space_is_refused(models, out_dir, capsys):
    """SDXL's VAE has SD1's layout, so its keys fit; the file says what it is made for when it is a
    whole checkpoint or carries modelspec metadata, and then a mismatch is refused."""
    out = out_dir / "x.safetensors"
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out),
                     "--vae", str(models.sdxl_a))
    assert "sdxl_a.safetensors" in line and "SDXL" in line and "SD1.x" in line and "pick a VAE for SD1/SD2" in line
    line = run_error(capsys, "merge", str(models.sdxl_a), str(models.sdxl_b), "-o", str(out),
                     "--vae", str(models.sd1_b))
    assert "sd1_b.safetensors" in line and "pick a VAE for SDXL" in line
    xl_vae = _vae_file(models, models.dir / "sdxl.vae.safetensors", source=models.sdxl_a,
                       metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--vae", str(xl_vae))
    assert "sdxl.vae.safetensors" in line and "stable-diffusion-xl-v1-base/vae" in line
    assert leftovers(out_dir, out.name) == []
    sd1_vae = _vae_file(models, models.dir / "sd1.vae.safetensors",
                        metadata={"modelspec.architecture": "stable-diffusion-v1/vae"})
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--vae", str(sd1_vae))


def test_vae_bake_is_recorded_and_reproduced_by_the_recipe(models, out_dir, capsys):
    vae = _vae_file(models, out_dir / "photo.vae.safetensors")
    first = out_dir / "baked.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(first), "--alpha", "0.3",
           "--vae", str(vae))
    got, source = load_tensors(first), load_file(str(vae))
    vae_keys = [k for k in got if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(got[k], source[k[len("first_stage_model."):]].half()) for k in vae_keys)
    recipe = json.loads(read_metadata(first)["lib_merge_recipe"])
    assert recipe["vae"] == "photo.vae.safetensors" and len(recipe["model_hashes"]) == 2
    assert json.loads(read_metadata(first)["sd_merge_recipe"])["bake_in_vae"] == "photo.vae.safetensors"
    again = out_dir / "again.safetensors"
    run_ok(capsys, "merge", "--recipe", str(first), "-o", str(again))
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(first.read_bytes()).digest()


def test_vae_from_a_checkpoint_and_an_incomplete_vae(models, out_dir, capsys):
    whole = _vae_file(models, out_dir / "other_ckpt.safetensors", prefix="first_stage_model.")
    out = out_dir / "from_ckpt.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--vae", str(whole))
    assert torch.equal(load_tensors(out)["first_stage_model.decoder.conv_out.bias"],
                       load_tensors(whole)["first_stage_model.decoder.conv_out.bias"].half())
    partial = _vae_file(models, out_dir / "partial.vae.safetensors", drop=3)
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "x.safetensors"),
                     "--vae", str(partial))
    assert "lacks 3 of the model's" in line and "VAE" in line
    assert leftovers(out_dir, "x.safetensors") == []


# ---- inspect and methods -------------------------------------------------------------------------


def parse_table(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and re.fullmatch(r"BASE|IN\d\d|M00|OUT\d\d", parts[0]):
            rows[parts[0]] = parts[1:]
    return rows


def test_inspect_one_model(models, capsys):
    stdout = run_ok(capsys, "inspect", str(models.sdxl_a))
    assert "SDXL" in stdout and str(models.sdxl_a) in stdout
    rows = parse_table(stdout)
    assert list(rows) == ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
    tensors = load_tensors(models.sdxl_a)
    assert sum(int(r[0]) for r in rows.values()) == len(tensors)
    total = sum(t.numel() for t in tensors.values())
    assert sum(float(r[1]) for r in rows.values()) == pytest.approx(total / 1e6, abs=0.01 * len(rows))
    assert f"{len(tensors)} keys" in stdout
    assert "F16" in stdout and "I64" in stdout


def test_inspect_identical_models_have_zero_difference(models, capsys):
    copy = models.dir / "copy_of_a.safetensors"
    copy.write_bytes(models.sd1_a.read_bytes())
    stdout = run_ok(capsys, "inspect", str(models.sd1_a), str(copy))
    rows = parse_table(stdout)
    assert len(rows) == 26
    for block, (keys, params, rel, cos) in rows.items():
        assert int(keys) > 0, block
        assert float(rel) == 0.0, (block, rel)
        assert float(cos) == pytest.approx(1.0, abs=1e-4), (block, cos)


def test_inspect_different_models(models, capsys):
    stdout = run_ok(capsys, "inspect", str(models.sd1_a), str(models.sd1_b))
    rows = parse_table(stdout)
    rel = {b: float(r[2]) for b, r in rows.items()}
    cos = {b: float(r[3]) for b, r in rows.items()}
    # models of one synthetic family differ by ~10 %: a small, non-zero difference, high cosine
    assert all(0.01 < v < 0.5 for v in rel.values()), rel
    assert all(0.9 < v < 1.0 for v in cos.values()), cos


def test_methods_lists_every_method_and_parameter(capsys):
    stdout = run_ok(capsys, "methods")
    assert "0 gives A, 1 gives B" in stdout
    for spec in all_methods():
        assert re.search(rf"^{re.escape(spec.name)}\s+\(models: ", stdout, re.M), spec.name
        for p in spec.params:
            assert f"--param {p.name}=" in stdout, (spec.name, p.name)
    assert "noise(seed=N,scale=S)" in stdout and "zero" in stdout
    for name in list(PRESETS)[:5]:
        assert name in stdout


# ---- bad input: one line, exit 2 -----------------------------------------------------------------


def test_missing_model_file(models, out_dir, capsys):
    missing = models.dir / "no_such_model.safetensors"
    line = run_error(capsys, "merge", str(models.sd1_a), str(missing), "-o", str(out_dir / "o.safetensors"))
    assert str(missing) in line and "not found" in line
    assert list(out_dir.iterdir()) == []


def test_missing_files_are_all_reported_at_once(models, out_dir, capsys):
    m1, m2 = models.dir / "gone1.safetensors", models.dir / "gone2.ckpt"
    line = run_error(capsys, "merge", str(m1), str(m2), "-o", str(out_dir / "o.safetensors"))
    assert str(m1) in line and str(m2) in line


def test_corrupt_model_file(models, out_dir, capsys):
    bad = models.dir / "truncated.safetensors"
    bad.write_bytes(models.sd1_b.read_bytes()[:-1000])
    line = run_error(capsys, "merge", str(models.sd1_a), str(bad), "-o", str(out_dir / "o.safetensors"))
    assert str(bad) in line and "truncated" in line
    garbage = models.dir / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    line = run_error(capsys, "inspect", str(garbage))
    assert str(garbage) in line and "corrupt" in line


def test_malicious_ckpt_on_the_command_line(models, out_dir, capsys, tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = models.dir / "evil.ckpt"
    torch.save({"state_dict": load_tensors(models.sd1_b), "x": Evil()}, evil)
    line = run_error(capsys, "merge", str(models.sd1_a), str(evil), "-o", str(out_dir / "o.safetensors"))
    assert str(evil) in line and "system" in line
    assert not marker.exists()


def test_lora_or_vae_instead_of_a_checkpoint(models, out_dir, capsys):
    from safetensors.torch import save_file

    lora = models.dir / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    line = run_error(capsys, "merge", str(models.sd1_a), str(lora), "-o", str(out_dir / "o.safetensors"))
    assert str(lora) in line and "LoRA" in line
    assert str(lora) in run_error(capsys, "inspect", str(lora))


@pytest.mark.parametrize("weights", ["0.1,0.2,0.3", ",".join(["0.5"] * 21)])
def test_wrong_weights_count_lists_valid_names(models, out_dir, capsys, weights):
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"),
                     "--weights", weights)
    assert "26" in line and "25" in line
    for name in ("BASE", "IN00", "IN11", "M00", "OUT11"):
        assert name in line
    assert list(out_dir.iterdir()) == []


def test_unknown_block_name(models, out_dir, capsys):
    line = run_error(capsys, "merge", str(models.sdxl_a), str(models.sdxl_b), "-o", str(out_dir / "o.safetensors"),
                     "--weights", "IN11=0.3")
    assert "IN11" in line and "OUT08" in line  # IN11 is not an SDXL block; the valid names are listed


def test_unknown_method(models, out_dir, capsys):
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"),
                     "--method", "weigthed_sum")
    assert "weigthed_sum" in line and "did you mean 'weighted_sum'" in line


def test_sd1_with_sdxl(models, out_dir, capsys):
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sdxl_b), "-o", str(out_dir / "o.safetensors"))
    assert models.sd1_a.name in line and models.sdxl_b.name in line and "SDXL" in line
    line = run_error(capsys, "inspect", str(models.sd1_a), str(models.sdxl_b))
    assert models.sd1_a.name in line and models.sdxl_b.name in line
    assert list(out_dir.iterdir()) == []


def test_bad_parameters(models, out_dir, capsys):
    out = str(out_dir / "o.safetensors")
    a, b = str(models.sd1_a), str(models.sd1_b)
    assert "NAME=VALUE" in run_error(capsys, "merge", a, b, "-o", out, "--param", "alpha")
    assert "gamma" in run_error(capsys, "merge", a, b, "-o", out, "--param", "gamma=1")
    assert "sd-mecha" in run_error(capsys, "merge", a, b, "-o", out, "--blocks", "comfy")
    assert "takes 3 models" in run_error(capsys, "merge", a, b, "-o", out, "--method", "add_difference")
    assert "noise" in run_error(capsys, "merge", a, "noise(sigma=2)", "-o", out)
    assert "--recipe" in run_error(capsys, "merge", "-o", out)
    assert list(out_dir.iterdir()) == []


def test_output_problems(models, out_dir, capsys):
    a, b = str(models.sd1_a), str(models.sd1_b)
    line = run_error(capsys, "merge", a, b, "-o", a, "--overwrite")
    assert "input of the merge" in line and a in line
    existing = out_dir / "exists.safetensors"
    existing.write_bytes(b"x")
    line = run_error(capsys, "merge", a, b, "-o", str(existing))
    assert str(existing) in line and "--overwrite" in line
    assert existing.read_bytes() == b"x"
    nowhere = out_dir / "missing_dir" / "o.safetensors"
    line = run_error(capsys, "merge", a, b, "-o", str(nowhere))
    assert "does not exist" in line


def test_bad_recipes(models, out_dir, capsys):
    out = str(out_dir / "o.safetensors")
    missing = models.dir / "nope.json"
    assert str(missing) in run_error(capsys, "merge", "--recipe", str(missing), "-o", out)
    v2 = models.dir / "v2.json"
    v2.write_text(json.dumps({"version": 2, "method": "weighted_sum", "models": ["a", "b"]}))
    line = run_error(capsys, "merge", "--recipe", str(v2), "-o", out)
    assert str(v2) in line and "version 2" in line
    extra = models.dir / "extra.json"
    extra.write_text(json.dumps({"version": 1, "method": "weighted_sum", "models": ["a"], "ratio": 1}))
    assert "ratio" in run_error(capsys, "merge", "--recipe", str(extra), "-o", out)
    broken = models.dir / "broken.json"
    broken.write_text("{")
    assert "not valid JSON" in run_error(capsys, "merge", "--recipe", str(broken), "-o", out)
    # a checkpoint that was not merged by lib_merge has no recipe to re-run
    line = run_error(capsys, "merge", "--recipe", str(models.sd1_a), "-o", out)
    assert str(models.sd1_a) in line and "lib_merge_recipe" in line
    assert list(out_dir.iterdir()) == []


def test_nan_input_on_the_command_line(models, out_dir, capsys):
    key = "model.diffusion_model.output_blocks.0.0.skip_connection.weight"
    B = load_tensors(models.sd1_b)
    bad = B[key].clone()
    bad.view(-1)[0] = float("inf")
    b = models.derive(models.sd1_b, "b_inf.safetensors", replace={key: bad})
    out = out_dir / "o.safetensors"
    line = run_error(capsys, "merge", str(models.sd1_a), str(b), "-o", str(out), "--alpha", "0.5")
    assert key in line and "b_inf.safetensors" in line
    assert leftovers(out_dir, out.name) == []


def test_nan_copied_at_alpha_zero_on_the_command_line(models, out_dir, capsys):
    """α = 0 copies A unmerged; a NaN in A is still one error line naming key, model and file."""
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    A = load_tensors(models.sd1_a)
    bad = A[key].clone()
    bad.view(-1)[7] = float("nan")
    a = models.derive(models.sd1_a, "a_nan.safetensors", replace={key: bad})
    out = out_dir / "o.safetensors"
    line = run_error(capsys, "merge", str(a), str(models.sd1_b), "-o", str(out), "--alpha", "0")
    assert key in line and "A (a_nan.safetensors)" in line
    assert leftovers(out_dir, out.name) == []
    line = run_error(capsys, "merge", str(models.sd1_a), "noise(seed=1,scale=inf)", "-o", str(out), "--alpha", "0.1")
    assert "scale" in line and "finite" in line
    assert leftovers(out_dir, out.name) == []


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` behaves as a read-only mount: creating, writing or removing anything in it fails
    with EROFS (the unlink of a file that does not exist included, as Linux does)."""
    import errno
    import os

    real_open, real_unlink = os.open, Path.unlink

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def ro_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_unlink(self, missing_ok=False):
        if inside(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "unlink", ro_unlink)


def test_read_only_output_filesystem_is_one_error_line(models, out_dir, capsys, monkeypatch):
    _read_only(monkeypatch, out_dir)
    out = out_dir / "x.safetensors"
    for extra in ((), ("--resume-file", "on")):
        line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), *extra)
        assert str(out) in line and "Read-only file system" in line and "writable folder" in line
    monkeypatch.undo()
    assert list(out_dir.iterdir()) == []


def test_unwritable_resume_file_leaves_nothing(models, out_dir, capsys, monkeypatch):
    """The output's temp file could be made but its resume file not: one line, and the temp
    file is not left behind (nothing could continue it)."""
    import builtins
    import errno
    import os

    real_open = os.open

    def no_resume(path, flags, *args, **kwargs):
        if str(path).endswith(".resume"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kwargs)

    def no_resume_tmp(path, *args, **kwargs):  # the resume file's first version is written as .resume.tmp
        if ".resume" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_builtin_open(path, *args, **kwargs)

    real_builtin_open = builtins.open
    monkeypatch.setattr(os, "open", no_resume)
    monkeypatch.setattr(builtins, "open", no_resume_tmp)
    out = out_dir / "x.safetensors"
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--resume-file", "on")
    assert "resume file" in line and "--resume-file off" in line
    monkeypatch.undo()
    assert list(out_dir.iterdir()) == []


def test_warnings_go_to_stderr_without_failing(models, out_dir, capsys):
    missing = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    b = models.derive(models.sd1_b, "b_missing.safetensors", drop=[missing])
    out = out_dir / "o.safetensors"
    code = main(["merge", str(models.sd1_a), str(b), "-o", str(out), "--no-hash"])
    captured = capsys.readouterr()
    assert code == 0
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and missing in warnings[0]
    assert out.exists()


def test_ctrl_c_during_merge_leaves_no_file(models, out_dir, capsys, monkeypatch):
    """The first Ctrl-C stops the merge cleanly: one error line, no output and no temp file, and
    the previous SIGINT handler is back afterwards."""
    import os
    import signal

    from lib_merge import cli

    class InterruptingBar:
        sent = False

        def update(self, done, total, key):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

        def close(self):
            pass

    monkeypatch.setattr(cli, "_progress_bar", InterruptingBar)
    before = signal.getsignal(signal.SIGINT)
    out = out_dir / "o.safetensors"
    # exit status 130 (128 + SIGINT), not 2: issue 9 changed it deliberately
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--threads", "2", code=130)
    assert "cancelled" in line or "interrupted" in line
    assert str(out) in line
    assert leftovers(out_dir, out.name) == []
    assert signal.getsignal(signal.SIGINT) is before


def test_negative_threads_is_a_one_line_error(models, out_dir, capsys):
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"),
                     "--threads", "-1")
    assert "threads" in line


def test_output_must_be_safetensors(models, out_dir, capsys):
    out = out_dir / "merged.ckpt"
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out))
    assert ".safetensors" in line and str(out) in line
    assert not out.exists()


def test_keyboard_interrupt_anywhere_exits_130(models, capsys, monkeypatch):
    import lib_merge.inspect as inspect_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_module, "inspect_models", interrupted)
    assert run_error(capsys, "inspect", str(models.sd1_a), code=130) == "error: interrupted"


def test_non_finite_alpha_names_alpha(models, out_dir, capsys):
    for flag in ("--alpha", "--beta"):
        line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), str(models.sd1_c),
                         "--method", "triple_sum", "-o", str(out_dir / "o.safetensors"), flag, "nan")
        assert f"{flag[2:]}=nan is not a finite number" in line and "base" not in line
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"),
                     "--alpha", "inf")
    assert "alpha=inf is not a finite number" in line
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("weights,token", [("IN99=1", "'IN99'"), ("0.1,0.2,0.3", "got 3 numbers"), ("GRAD_X", "'GRAD_X'")])
def test_block_weight_errors_are_short(models, out_dir, capsys, weights, token):
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"),
                     "--weights", weights)
    assert token in line and "BASE, IN00-IN11, M00, OUT00-OUT11" in line
    assert len(line) < 300, len(line)


def test_directory_as_input_says_so(models, out_dir, capsys):
    folder = models.dir / "sub.safetensors"
    folder.mkdir()
    for path in (models.dir, folder):
        line = run_error(capsys, "merge", str(path), str(models.sd1_b), "-o", str(out_dir / "o.safetensors"))
        assert f"{path}: is a directory" in line and "unknown checkpoint type" not in line


def test_too_many_threads_are_capped_with_a_note(models, out_dir, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    out = out_dir / "o.safetensors"
    code = main(["merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out), "--threads", "1000", "--no-hash"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.err.splitlines() if "threads=1000" in line]
    assert len(notes) == 1 and "2 cores" in notes[0] and "using 8" in notes[0]
    assert re.search(r"^plan: .*, 8 threads", captured.out, re.M), captured.out
    assert torch.equal(load_tensors(out)[CONV_IN_KEY], _merged_conv_in(models))


CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _merged_conv_in(models) -> torch.Tensor:
    a, b = load_tensors(models.sd1_a)[CONV_IN_KEY].float(), load_tensors(models.sd1_b)[CONV_IN_KEY].float()
    return torch.lerp(a, b, 0.5).half()


def test_moved_recipe_finds_its_models_with_models_dir(models, out_dir, capsys, tmp_path):
    first = out_dir / "first.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(first), "--alpha", "0.3")
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    recipe = moved / "first.safetensors"
    recipe.write_bytes(first.read_bytes())
    again = out_dir / "again.safetensors"
    line = run_error(capsys, "merge", "--recipe", str(recipe), "-o", str(again))
    assert "sd1_a.safetensors" in line and "sd1_b.safetensors" in line and "--models-dir" in line
    assert not again.exists()
    out = run_ok(capsys, "merge", "--recipe", str(recipe), "-o", str(again), "--models-dir", str(models.dir))
    assert again.read_bytes() == first.read_bytes()  # same models found, same folder: same bytes
    assert f"sha256 {hashlib.sha256(first.read_bytes()).hexdigest()}" in out
    line = run_error(capsys, "merge", "--recipe", str(recipe), "-o", str(out_dir / "x.safetensors"),
                     "--models-dir", str(tmp_path / "nope"))
    assert "--models-dir" in line and "not a folder" in line
    line = run_error(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "x.safetensors"),
                     "--models-dir", str(models.dir))
    assert "--recipe" in line


def test_recipe_with_other_models_says_which_differ(models, out_dir, capsys):
    first = out_dir / "first.safetensors"
    run_ok(capsys, "merge", str(models.sd1_a), str(models.sd1_b), "-o", str(first), "--alpha", "0.3")
    code = main(["merge", "--recipe", str(first), str(models.sd1_a), str(models.sd1_c), "-o",
                 str(out_dir / "other.safetensors")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, captured.err
    assert "B (sd1_c.safetensors) is not the file the recipe recorded" in warnings[0]
    # the same files given again: nothing to say
    main(["merge", "--recipe", str(first), str(models.sd1_a), str(models.sd1_b), "-o", str(out_dir / "same.safetensors")])
    assert "warning" not in capsys.readouterr().err
