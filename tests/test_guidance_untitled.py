import re

import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.untitled import (
    gibberish_prompt,
    untitled_prompts,
    untitled_same_cond,
    zero_like_conditioning,
)


def test_gibberish_is_reproducible_per_seed_and_differs_between_seeds():
    assert gibberish_prompt(1234) == gibberish_prompt(1234)
    assert gibberish_prompt(1234) != gibberish_prompt(1235)
    words = gibberish_prompt(7, n_tokens=12).split(" ")
    assert len(words) == 12 and all(re.fullmatch(r"[a-z]+", w) for w in words)


def test_gibberish_is_fixed_across_python_versions():
    # SHA-256 based, so this exact string must never change; a change breaks pasted infotexts.
    assert gibberish_prompt(0, n_tokens=4) == "sako ja pu fih"


def test_gibberish_prefix_is_stable():
    assert gibberish_prompt(42, 5).split(" ") == gibberish_prompt(42, 9).split(" ")[:5]


def test_gibberish_rejects_zero_words():
    with pytest.raises(BadParameterError):
        gibberish_prompt(1, 0)


def test_zero_conditioning_of_a_tensor():
    c = torch.randn(2, 77, 768)
    z = zero_like_conditioning(c)
    assert z.shape == c.shape and not z.any()


def test_zero_sdxl_conditioning_keeps_the_size_embeddings():
    vector = torch.randn(2, 2816)
    cond = {"crossattn": torch.randn(2, 77, 2048), "vector": vector, "c_concat": torch.ones(2, 5, 8, 8)}
    z = zero_like_conditioning(cond)
    assert not z["crossattn"].any()
    assert not z["vector"][:, :1280].any()
    # 6 Fourier embeddings of 256 dims: original size, crop, target size.
    assert torch.equal(z["vector"][:, -1536:], vector[:, -1536:])
    assert torch.equal(z["c_concat"], cond["c_concat"])
    assert cond["vector"] is vector and vector[:, :1280].any()  # the input is not modified


def test_zero_sdxl_refiner_vector_keeps_its_1280_non_text_dims():
    vector = torch.randn(1, 2560)
    z = zero_like_conditioning({"crossattn": torch.randn(1, 77, 1280), "vector": vector})
    assert not z["vector"][:, :1280].any() and torch.equal(z["vector"][:, 1280:], vector[:, 1280:])


def test_zero_conditioning_rejects_unknown_things():
    with pytest.raises(BadParameterError):
        zero_like_conditioning("a prompt")
    with pytest.raises(BadParameterError):
        zero_like_conditioning({"crossattn": torch.zeros(1, 2, 3), "vector": torch.zeros(1, 1280)})


def test_untitled_prompts_per_mode():
    assert untitled_prompts("empty", 5, 2) == (["", ""], ["", ""])
    assert untitled_prompts("zero", 5, 1) == ([""], [""])
    prompts, negatives = untitled_prompts("gibberish", 5, 3)
    assert prompts == [gibberish_prompt(5), gibberish_prompt(6), gibberish_prompt(7)] and negatives == ["", "", ""]
    for bad in ("off", "nothing"):
        with pytest.raises(BadParameterError):
            untitled_prompts(bad, 0, 1)


def test_same_cond_per_mode_and_model():
    assert untitled_same_cond("zero", is_sdxl=True) and untitled_same_cond("zero", is_sdxl=False)
    assert untitled_same_cond("empty", is_sdxl=False) and not untitled_same_cond("empty", is_sdxl=True)
    assert not untitled_same_cond("gibberish", is_sdxl=False)


def _sdxl_side(vector_dims, aesthetic=None):
    """One side of an SDXL conditioning after ``zero``: text parts zero, size embeddings (and, on the
    refiner, the aesthetic score embedding in the last 256 dims) kept."""
    vector = torch.zeros(1, vector_dims)
    vector[:, 1280:] = 0.3
    if aesthetic is not None:
        vector[:, -256:] = aesthetic / 10.0
    return {"crossattn": torch.zeros(1, 77, 1280 if aesthetic is not None else 2048), "vector": vector}


def test_zero_on_the_sdxl_refiner_is_not_same_cond():
    base_c, base_u = _sdxl_side(2816), _sdxl_side(2816)
    assert untitled_same_cond("zero", is_sdxl=True, cond=base_c, uncond=base_u)
    # Both hosts embed aesthetic score 6.0 for the prompt and 2.5 for the negative on the refiner.
    refiner_c, refiner_u = _sdxl_side(2560, 6.0), _sdxl_side(2560, 2.5)
    assert not untitled_same_cond("zero", is_sdxl=True, cond=refiner_c, uncond=refiner_u)
    # Equal conds never turn a mode whose text differs into c ≡ u.
    assert not untitled_same_cond("empty", is_sdxl=True, cond=base_c, uncond=base_u)
    assert not untitled_same_cond("zero", is_sdxl=True, cond=[base_c], uncond=[base_c, base_u])

