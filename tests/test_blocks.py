"""Block-weight parsing, presets and the canonical string form."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lib_merge.arch import SD1, SD2, SDXL
from lib_merge.blocks import (
    blocks_for,
    format_block_weights,
    parse_block_weights,
    preset_names,
    preset_values,
)
from lib_merge.errors import BadBlockWeightsError, UnknownArchitectureError
from lib_merge.presets import PRESETS, PRESETS_XL

PRESET_DATA = Path(__file__).resolve().parent / "data" / "presets.json"
HINT = "python -m lib_merge methods"


def _values(weights: dict) -> list:
    return list(weights.values())


# ---- presets -------------------------------------------------------------------------------------


def test_preset_counts_and_lengths() -> None:
    assert len(PRESETS) == 38
    assert len(PRESETS_XL) == 34
    assert all(len(v) == 26 for v in PRESETS.values())
    assert all(len(v) == 20 for v in PRESETS_XL.values())
    assert all(isinstance(x, float) for v in PRESETS.values() for x in v)


def test_preset_spot_values() -> None:
    assert PRESETS["GRAD_V"][:4] == (0.0, 1.0, 0.9167, 0.8333)
    assert PRESETS["GRAD_V"][13] == 0.0  # M00
    assert PRESETS["SMOOTHSTEP*3"][10] == 0.9492
    assert PRESETS["TRUE_CUBIC_HERMITE"][-2] == 0.8426
    assert PRESETS["ALL_B"] == (1.0,) * 26
    assert PRESETS_XL["GRAD_V"][:3] == (0.0, 1.0, 0.889)
    assert PRESETS_XL["OUT09_5"][10] == 0.5
    assert PRESETS_XL["CUBIC_HERMITE"][1:4] == (0.0, 0.268, 0.461)


def _reference_table(name: str) -> dict:
    rows = json.loads(PRESET_DATA.read_text())[name]
    return {preset: tuple(float(x) for x in values.split(",")) for preset, values in rows.items()}


def test_presets_match_the_reference_tables() -> None:
    assert PRESETS == _reference_table("presets")
    assert PRESETS_XL == _reference_table("presets_xl")
    assert list(PRESETS) == list(_reference_table("presets"))


def test_preset_names() -> None:
    assert preset_names(SD1) == list(PRESETS)
    xl = preset_names("sdxl")
    assert set(xl) == set(PRESETS) | set(PRESETS_XL)
    assert "OUT09" in xl and "OUT09" not in preset_names(SD2)


def test_blocks_for() -> None:
    assert blocks_for("sd1") == SD1.blocks
    assert blocks_for(SDXL) == SDXL.blocks


# ---- parse forms ---------------------------------------------------------------------------------


def test_none_and_numbers() -> None:
    assert parse_block_weights(None, SD1) == dict.fromkeys(SD1.blocks, 0.0)
    assert parse_block_weights(None, SD1, base=0.3) == dict.fromkeys(SD1.blocks, 0.3)
    assert parse_block_weights(0.5, "sdxl") == dict.fromkeys(SDXL.blocks, 0.5)
    assert parse_block_weights(1, SD2) == dict.fromkeys(SD2.blocks, 1.0)
    assert parse_block_weights("0.25", SD1) == dict.fromkeys(SD1.blocks, 0.25)
    assert parse_block_weights("", SD1, base=0.4) == dict.fromkeys(SD1.blocks, 0.4)
    assert parse_block_weights(np.float32(0.5), SD1)["M00"] == 0.5


def test_result_is_in_block_order() -> None:
    weights = parse_block_weights({"OUT08": 1, "BASE": 0.5}, SDXL)
    assert tuple(weights) == SDXL.blocks


def test_sequences() -> None:
    vec = [i / 100 for i in range(26)]
    assert _values(parse_block_weights(vec, SD1)) == vec
    assert _values(parse_block_weights(tuple(vec), SD1)) == vec
    no_base = parse_block_weights(vec[1:], SD1, base=0.9)
    assert no_base["BASE"] == 0.0  # runtime-block-merge never merges text encoder / VAE
    assert _values(no_base)[1:] == vec[1:]
    xl = [i / 100 for i in range(20)]
    assert _values(parse_block_weights(xl, SDXL)) == xl
    assert _values(parse_block_weights(np.array(xl), SDXL)) == pytest.approx(xl)
    assert _values(parse_block_weights(xl[1:], SDXL)) == [0.0] + xl[1:]
    assert parse_block_weights([], SD1, base=0.2) == dict.fromkeys(SD1.blocks, 0.2)


def test_string_vectors() -> None:
    vec = [round(i / 25, 4) for i in range(26)]
    text = ", ".join(str(v) for v in vec)
    assert _values(parse_block_weights(text, SD1)) == vec
    assert _values(parse_block_weights(text + ",", SD1)) == vec  # trailing comma
    assert _values(parse_block_weights(",".join(map(str, vec[1:])), SD2)) == [0.0] + vec[1:]


def test_sdxl_truncates_26_like_supermerger() -> None:
    vec = [float(i) for i in range(26)]  # value = position in BASE, IN00..IN11, M00, OUT00..OUT11
    weights = parse_block_weights(vec, SDXL)
    assert weights["BASE"] == 0 and weights["IN00"] == 1 and weights["IN08"] == 9
    assert weights["M00"] == 13  # IN09-IN11 (10, 11, 12) dropped
    assert weights["OUT00"] == 14 and weights["OUT08"] == 22  # OUT09-OUT11 (23-25) dropped
    assert _values(weights) == [float(i) for i in list(range(10)) + [13] + list(range(14, 23))]
    from_string = parse_block_weights(",".join(str(i) for i in range(26)), SDXL)
    assert from_string == weights


def test_sdxl_takes_25_values() -> None:
    vec = [float(i) for i in range(1, 26)]  # IN00..OUT11 without BASE
    weights = parse_block_weights(vec, SDXL, base=0.7)
    assert weights["BASE"] == 0.0
    assert weights["IN00"] == 1 and weights["M00"] == 13 and weights["OUT08"] == 22


def test_presets_parse() -> None:
    assert _values(parse_block_weights("GRAD_V", SD1)) == list(PRESETS["GRAD_V"])
    assert parse_block_weights("grad_v", SD1) == parse_block_weights("GRAD_V", SD1)
    assert _values(parse_block_weights("reverse-smoothstep", SD2)) == list(
        PRESETS["REVERSE-SMOOTHSTEP"]
    )
    # SDXL uses the native XL curve where one exists...
    assert _values(parse_block_weights("GRAD_V", SDXL)) == list(PRESETS_XL["GRAD_V"])
    assert _values(parse_block_weights("out09", SDXL)) == list(PRESETS_XL["OUT09"])
    # ...and truncates the 26-value preset otherwise.
    out12 = parse_block_weights("OUT12", SDXL)
    assert [out12[b] for b in SDXL.blocks if b.startswith("OUT")] == [1.0] * 9
    assert [out12[b] for b in SDXL.blocks if not b.startswith("OUT")] == [0.0] * 11
    assert _values(parse_block_weights("TRUE_CUBIC_HERMITE", SDXL))[10] == PRESETS[
        "TRUE_CUBIC_HERMITE"
    ][13]
    assert preset_values("ALL_B", SDXL) == (1.0,) * 20


def test_preset_with_overrides() -> None:
    weights = parse_block_weights("GRAD_V, IN04=0.3, out11=0.1", SD1)
    expected = dict(zip(SD1.blocks, PRESETS["GRAD_V"]))
    expected.update(IN04=0.3, OUT11=0.1)
    assert weights == expected
    # Overrides may come first; they still apply after the preset.
    assert parse_block_weights("IN04=0.3,GRAD_V,OUT11=0.1", SD1) == expected


def test_overrides_ranges_wildcards_aliases() -> None:
    w = parse_block_weights("0.5,IN04-IN06=0.3,OUT*=1,m=0.2,in1=0.9,base=0", SD1)
    assert w["IN01"] == 0.9 and w["IN03"] == 0.5
    assert w["IN04"] == w["IN05"] == w["IN06"] == 0.3 and w["IN07"] == 0.5
    assert all(w[b] == 1.0 for b in SD1.blocks if b.startswith("OUT"))
    assert w["M00"] == 0.2 and w["BASE"] == 0.0
    span = parse_block_weights("IN10-OUT01=1", SD1)
    assert [b for b, v in span.items() if v == 1.0] == ["IN10", "IN11", "M00", "OUT00", "OUT01"]
    assert parse_block_weights("*=0.25", SDXL) == dict.fromkeys(SDXL.blocks, 0.25)
    assert parse_block_weights("IN0*=1", SD1)["IN09"] == 1.0
    assert parse_block_weights("IN0*=1", SD1)["IN10"] == 0.0
    assert parse_block_weights("IN05=-0.5,OUT00=1.5,OUT01=1e-3", SD1)["IN05"] == -0.5


def test_mapping_overrides_base() -> None:
    w = parse_block_weights({"in04": 0.3, "OUT*": "1", "M00": 0.5}, SDXL, base=0.2)
    assert w["BASE"] == 0.2 and w["IN04"] == 0.3 and w["M00"] == 0.5
    assert all(w[f"OUT{i:02d}"] == 1.0 for i in range(9))
    full = parse_block_weights("GRAD_A", SD1)
    assert parse_block_weights(full, SD1) == full


# ---- errors --------------------------------------------------------------------------------------


def _error(spec, arch) -> str:
    with pytest.raises(BadBlockWeightsError) as err:
        parse_block_weights(spec, arch)
    message = str(err.value)
    assert HINT in message
    return message


def test_wrong_count_message() -> None:
    message = _error("0,1,0.5", SD1)
    assert "'0,1,0.5'" in message and "got 3 numbers" in message
    assert "26 (BASE first) or 25 (without BASE)" in message
    assert "BASE, IN00-IN11, M00, OUT00-OUT11" in message  # the valid names as ranges (issue 9)
    xl = _error([0.1] * 21, SDXL)
    assert "got 21 numbers" in xl and "20 (BASE first) or 19" in xl and "26 or 25" in xl
    assert "BASE, IN00-IN08, M00, OUT00-OUT08" in xl


def test_twenty_values_are_not_sd1() -> None:
    assert "SDXL vector" in _error([0.5] * 20, SD1)
    assert "SDXL vector" in _error(",".join(["0.5"] * 19), SD2)


def test_unknown_block_message() -> None:
    message = _error("IN09=0.5", SDXL)
    assert "unknown block 'IN09'" in message and "'IN09=0.5'" in message
    assert "OUT08" in message and "OUT09," not in message
    assert "unknown block 'FOO'" in _error({"FOO": 1}, SD1)
    assert "matches no block" in _error("MID*X=1", SD1)


def test_unknown_preset_and_bad_numbers() -> None:
    assert "'GRAD_Z' is neither a number nor a known preset" in _error("GRAD_Z", SD1)
    assert "'OUT09'" in _error("OUT09", SD1)  # an XL-only preset
    assert "bad number 'abc' in 'IN04=abc'" in _error("IN04=abc", SD1)
    assert "bad number '' in 'IN04='" in _error("IN04=", SD1)
    assert "'nan'" in _error("nan", SD1)
    assert "not a finite number" in _error([float("inf")] * 26, SD1)
    assert "not a number" in _error({"IN04": "x"}, SD1)
    assert "boolean" in _error(True, SD1)
    assert "boolean" in _error([True] * 26, SD1)
    assert "missing block name" in _error("=0.5", SD1)


def test_structural_errors() -> None:
    assert "runs backwards" in _error("IN06-IN04=1", SD1)
    assert "bad block range" in _error("IN01-IN02-IN03=1", SD1)
    assert "empty item at position 2" in _error("0.5,,IN04=1", SD1)
    assert "cannot be combined" in _error("GRAD_V,0.5", SD1)
    assert "cannot be combined" in _error("GRAD_V,GRAD_A", SD1)
    assert "unsupported block-weight value of type object" in _error(object(), SD1)
    with pytest.raises(UnknownArchitectureError):
        parse_block_weights(None, "sd3")


# ---- format --------------------------------------------------------------------------------------


def test_format_shortest_form() -> None:
    weights = dict.fromkeys(SDXL.blocks, 0.0)
    weights.update(IN00=1.0, IN01=0.5, IN02=-0.0, IN03=1 / 3, OUT08=1e-05)
    text = format_block_weights(weights, SDXL)
    assert text.startswith("0,1,0.5,0,0.3333333333333333,")
    assert text.endswith(",1e-05")
    assert parse_block_weights(text, SDXL) == weights


@pytest.mark.parametrize("arch", [SD1, SD2, SDXL])
def test_format_parse_round_trip(arch) -> None:
    rng = random.Random(1234)
    for _ in range(50):
        choices = [0.0, 1.0, 0.5, rng.random(), rng.uniform(-2, 2)]
        weights = {b: rng.choice(choices) for b in arch.blocks}
        assert parse_block_weights(format_block_weights(weights, arch), arch) == weights
    for name in preset_names(arch):
        weights = parse_block_weights(name, arch)
        assert parse_block_weights(format_block_weights(weights, arch), arch) == weights


def test_format_errors() -> None:
    with pytest.raises(BadBlockWeightsError, match="no weight for block.*OUT11"):
        format_block_weights({b: 0.0 for b in SD1.blocks if b != "OUT11"}, SD1)
    with pytest.raises(BadBlockWeightsError, match="unknown block 'IN09'"):
        format_block_weights({**dict.fromkeys(SDXL.blocks, 0.0), "IN09": 1.0}, SDXL)
