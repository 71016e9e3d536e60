"""``toy evidence --quick`` end to end (issue 11 item 8): train → soups through the real pot →
merges through the engine → sampling through the guidance stack → metrics → report. Quick
settings check the pipeline, not the claims; this is the run CI makes."""
from __future__ import annotations

import re
import struct

import pytest

from lib_merge.cli import main
from lib_merge.toy.evidence import GUIDANCE_ROWS, QUICK
from lib_merge.toy.family import train_family

SECTIONS = ("## Soup vs paragon", "### Domain shards", "### Aesthetic shards", "## Unlearning", "## Style mixing",
            "## Guidance", "### High scale", "## Merge methods", "## Run")
FIGURES = ("soup-domain.png", "soup-aesthetic.png", "style-mixing.png", "untitled.png", "alpha-sweep.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("evidence")
    out = work / "report" / "evidence.md"
    assert main(["toy", "evidence", "--quick", "--work", str(work), "--out", str(out), "--threads", "1"]) == 0
    return work, out


def _table_rows(text: str, heading: str) -> list[list[str]]:
    body = text.split(heading, 1)[1]
    rows = []
    for line in body.splitlines()[1:]:
        if line.startswith("## ") or line.startswith("### "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def test_the_report_has_every_section_table_and_figure(quick_run):
    work, out = quick_run
    text = out.read_text()
    for section in SECTIONS:
        assert section in text, section
    for name in FIGURES:
        png = out.parent / "evidence-figures" / name
        assert f"evidence-figures/{name}" in text
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 16 and height > 16
    guidance = _table_rows(text, "## Guidance")
    assert [r[0] for r in guidance] == list(GUIDANCE_ROWS)
    soup = _table_rows(text, "### Domain shards")
    assert [r[0] for r in soup][:3] == ["base (before fine-tuning)", "paragon (union, equal compute)",
                                         "uniform soup of the 3 shard models"]
    number = re.compile(r"^-?\d+\.\d+ ± \d+\.\d+$")
    for row in soup + guidance:
        assert all(number.match(cell) for cell in row[1:]), row
    assert "| **total** |" in text


def test_unlearning_rows_come_from_the_pot_and_differ_from_the_full_soup(quick_run):
    work, _ = quick_run
    soups = work / "soups"
    full = (soups / "soup-domain.safetensors").read_bytes()
    for shard in ("round", "square", "pointed"):
        without = soups / f"soup-domain-without-{shard}.safetensors"
        assert without.exists() and without.read_bytes() != full
    merges = {p.name for p in (work / "merges").iterdir()}
    for expected in ("TIES_k_0.2.safetensors", "geometric_median.safetensors", "model_stock.safetensors", "DGMLA.safetensors"):
        assert expected in merges


def test_a_second_run_keeps_the_trained_family(quick_run):
    work, _ = quick_run
    before = {p.name: p.stat().st_mtime_ns for p in (work / "models").glob("*.safetensors")}
    logs = []
    train_family(work / "models", QUICK.family, threads=1, log=logs.append)
    after = {p.name: p.stat().st_mtime_ns for p in (work / "models").glob("*.safetensors")}
    assert before == after and len(before) == 8 and all("kept" in line for line in logs)
