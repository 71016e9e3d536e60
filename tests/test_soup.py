"""Incremental soups: add/remove/reweight round trips against the direct weighted average,
clear errors that leave the pot unchanged, the export's recipe, and the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lib_merge.soup.sums as soup_sums
from lib_merge.cli import main
from lib_merge.errors import ArchitectureMismatchError, CorruptPotError, NonFiniteError, SoupError
from lib_merge.io.reader import open_checkpoint
from lib_merge.recipe import METADATA_KEY
from lib_merge.soup import Pot
from lib_merge.synthetic import write_synthetic_checkpoint

from _slim import write_slim_unet


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("soup")
    made = [write_slim_unet(folder / f"m{i}.safetensors", model=i, family=8) for i in range(4)]
    made.append(write_slim_unet(folder / "m4_bf16.safetensors", model=4, family=8, dtype=torch.bfloat16))
    return made


def snapshot(pot: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pot.iterdir())}


def direct_average(members: dict[Path, float], dtype=torch.float16) -> dict[str, torch.Tensor]:
    readers = {p: open_checkpoint(p) for p in members}
    total = sum(members.values())
    first = next(iter(readers.values()))
    out = {k: (sum(r.get(k).double() * members[p] for p, r in readers.items()) / total).to(dtype) for k in first.infos}
    for r in readers.values():
        r.close()
    return out


def assert_export_matches(path: Path, expected: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(path) as reader:
        assert set(reader.infos) == set(expected)
        for key, value in expected.items():
            got = reader.get(key)
            # within fp16 rounding: at most one unit in the last place of the expected value
            ulp = torch.finfo(torch.float16).eps * value.float().abs().clamp(min=2.0 ** -14)
            assert torch.all((got.float() - value.float()).abs() <= ulp), key


def test_add_remove_reweight_round_trips(models, tmp_path):
    pot = Pot.init(tmp_path / "pot")
    pot.add(models[:2])
    pot.add([models[2]], weight=2.0)
    pot.add([models[4]], weight=0.5)  # a bf16 ingredient
    pot.remove([models[1]])
    pot.reweight(models[2], 3.0)
    pot.add([models[3]], weight=1.5)
    pot.remove([models[0]])
    pot.add([models[1]])
    expected = {models[2]: 3.0, models[4]: 0.5, models[3]: 1.5, models[1]: 1.0}
    assert {Path(i.path): i.weight for i in pot.ingredients} == {p.resolve(): w for p, w in expected.items()}
    out, digest = pot.export(tmp_path / "soup.safetensors")
    assert_export_matches(out, direct_average(expected))
    assert len(digest) == 64
    # the pot reopens from disk with the same state, and verifies
    again = Pot(tmp_path / "pot")
    again.verify()
    assert again.total_weight == 6.0 and again.data["generation"] == 8


def test_add_then_remove_is_the_identity(models, tmp_path):
    pot = Pot.init(tmp_path / "pot")
    pot.add(models[:2])
    pot.export(tmp_path / "before.safetensors")
    pot.add([models[2]], weight=0.3)
    pot.remove([models[2]])
    pot.export(tmp_path / "after.safetensors")
    with open_checkpoint(tmp_path / "before.safetensors") as a, open_checkpoint(tmp_path / "after.safetensors") as b:
        for key in a.infos:
            assert torch.equal(a.get(key), b.get(key)), key


def test_order_does_not_matter(models, tmp_path):
    one, two = Pot.init(tmp_path / "one"), Pot.init(tmp_path / "two")
    one.add(models[:3])
    for m in reversed(models[:3]):
        two.add([m])
    one.export(tmp_path / "one.safetensors", hash_output=False)
    two.export(tmp_path / "two.safetensors", hash_output=False)
    with open_checkpoint(tmp_path / "one.safetensors") as a, open_checkpoint(tmp_path / "two.safetensors") as b:
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.infos)


def test_errors_leave_the_pot_unchanged(models, tmp_path, monkeypatch):
    folder = tmp_path / "pot"
    pot = Pot.init(folder)
    pot.add(models[:2])
    before = snapshot(folder)
    sdxl = write_synthetic_checkpoint(tmp_path / "xl.safetensors", "sdxl", width_divisor=64, unet_only=True)
    with pytest.raises(ArchitectureMismatchError, match="sdxl"):
        pot.add([sdxl])
    full = write_synthetic_checkpoint(tmp_path / "full.safetensors", "sd1", width_divisor=32, family=8)
    with pytest.raises(ArchitectureMismatchError, match="layout"):
        pot.add([full])
    with pytest.raises(SoupError, match="not in the pot"):
        pot.remove([models[3]])
    with pytest.raises(SoupError, match="already in the pot"):
        pot.add([models[0]])
    broken = write_slim_unet(tmp_path / "nan.safetensors", model=9, family=8,
                             nan_key="model.diffusion_model.input_blocks.0.0.weight")
    with pytest.raises(NonFiniteError, match="nan.safetensors"):
        pot.add([broken])

    def crash(*args, **kwargs):  # a failure in the middle of rewriting the sums
        raise OSError("disk gone")

    monkeypatch.setattr(soup_sums, "_update_key", crash)
    with pytest.raises(OSError):
        pot.add([models[2]])
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert Pot(folder).total_weight == 2.0


def test_corrupted_pot_is_detected_and_left_alone(models, tmp_path):
    folder = tmp_path / "pot"
    pot = Pot.init(folder)
    pot.add(models[:2])
    sums = folder / pot.data["sums"]
    raw = bytearray(sums.read_bytes())
    raw[-3] ^= 0x40  # flip one bit of the last tensor's data
    sums.write_bytes(bytes(raw))
    before = snapshot(folder)
    with pytest.raises(CorruptPotError, match="checksum"):
        pot.add([models[2]])
    with pytest.raises(CorruptPotError, match="checksum"):
        pot.export(tmp_path / "out.safetensors")
    with pytest.raises(CorruptPotError):
        Pot(folder).verify()
    assert snapshot(folder) == before and not (tmp_path / "out.safetensors").exists()
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["ingredients"][0]["weight"] = 5.0
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptPotError, match="manifest"):
        Pot(folder)


def test_export_recipe_reruns_from_the_ingredients(models, tmp_path):
    pot = Pot.init(tmp_path / "pot", base=models[0])
    pot.add(models[1:3], weight=2.0)
    pot.add([models[3]])
    out, _ = pot.export(tmp_path / "soup.safetensors")
    with open_checkpoint(out) as reader:
        recipe = json.loads(reader.metadata[METADATA_KEY])
        summary = json.loads(reader.metadata["lib_merge_soup"])
    assert recipe["method"] == "soup" and len(recipe["model_hashes"]) == 3
    assert [i["weight"] for i in summary["ingredients"]] == [2.0, 2.0, 1.0]
    rerun = tmp_path / "rerun.safetensors"
    assert main(["merge", "--recipe", str(out), "-o", str(rerun), "--no-hash"]) == 0
    with open_checkpoint(out) as a, open_checkpoint(rerun) as b:
        for key in a.infos:
            assert torch.allclose(a.get(key).float(), b.get(key).float(), rtol=2e-3, atol=1e-5), key
    # with a base: base + scale·(average − base), also re-runnable
    scaled, _ = pot.export(tmp_path / "scaled.safetensors", scale=1.5)
    avg = direct_average({models[1]: 2.0, models[2]: 2.0, models[3]: 1.0}, torch.float64)
    with open_checkpoint(models[0]) as base, open_checkpoint(scaled) as got:
        for key in got.infos:
            want = (base.get(key).double() + 1.5 * (avg[key] - base.get(key).double())).half()
            assert torch.allclose(got.get(key).float(), want.float(), rtol=1e-3, atol=1e-6), key
    assert main(["merge", "--recipe", str(scaled), "-o", str(tmp_path / "scaled2.safetensors"), "--no-hash"]) == 0


def test_cli_soup_commands(models, tmp_path, capsys):
    pot = str(tmp_path / "pot")
    assert main(["soup", "init", pot, "--base", str(models[0])]) == 0
    assert main(["soup", "add", pot, str(models[1]), str(models[2]), "--weight", "2"]) == 0
    assert main(["soup", "reweight", pot, str(models[2]), "0.5"]) == 0
    assert main(["soup", "remove", pot, str(models[1])]) == 0
    assert main(["soup", "add", pot, str(models[3])]) == 0
    assert main(["soup", "show", pot, "--verify"]) == 0
    shown = capsys.readouterr().out
    assert "architecture: sd1" in shown and "m2" in shown and "m3" in shown and "verified" in shown
    assert "base: m0" in shown
    out = tmp_path / "soup.safetensors"
    assert main(["soup", "export", pot, "-o", str(out)]) == 0
    assert_export_matches(out, direct_average({models[2]: 0.5, models[3]: 1.0}))
    assert main(["soup", "remove", pot, str(models[0])]) == 2  # the base is not an ingredient
    assert "not in the pot" in capsys.readouterr().err
    assert main(["soup", "show", str(tmp_path / "nowhere")]) == 2


def test_one_change_at_a_time(models, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    folder = tmp_path / "pot"
    first = Pot.init(folder)
    first.add([models[0]])
    stale = Pot(folder)
    first.add([models[1]])
    with pytest.raises(SoupError, match="changed by another command"):
        stale.add([models[2]])
    fd = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(SoupError, match="another soup command"):
            first.add([models[2]])
    finally:
        os.close(fd)
    assert Pot(folder).total_weight == 2.0


def test_non_finite_copied_key_is_refused(models, tmp_path):
    """Copied keys (here a float schedule buffer) go into every export unchanged: a NaN there is
    refused when the pot adopts them, as a NaN in an averaged key is."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(models[0]))
    tensors["alphas_cumprod"] = torch.tensor([1.0, float("nan"), 0.5])
    bad = tmp_path / "buffer_nan.safetensors"
    save_file(tensors, str(bad))
    folder = tmp_path / "pot"
    pot = Pot.init(folder)
    before = snapshot(folder)
    with pytest.raises(NonFiniteError, match=r"alphas_cumprod: NaN/Inf in buffer_nan\.safetensors"):
        pot.add([bad])
    after = {name: data for name, data in snapshot(folder).items() if name != ".lock"}  # the lock stays
    assert after == before and Pot(folder).ingredients == []
    with pytest.raises(NonFiniteError, match="alphas_cumprod"):
        Pot.init(tmp_path / "based", base=bad)
    assert not (tmp_path / "based" / "manifest.json").exists()


def test_read_only_pot_is_one_clear_error(models, tmp_path, monkeypatch, capsys):
    import errno

    folder = tmp_path / "pot"
    Pot.init(folder)
    before = snapshot(folder)
    real_open, real_unlink = os.open, Path.unlink

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_unlink(self, missing_ok=False):
        if str(self).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "unlink", ro_unlink)
    code = main(["soup", "add", str(folder), str(models[0])])
    err = capsys.readouterr().err
    monkeypatch.undo()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(folder) in lines[0] and "Read-only file system" in lines[0]
    assert snapshot(folder) == before
