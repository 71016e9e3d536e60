"""Word-level tokenizer over the caption grammar's vocabulary.

Layout of one encoded prompt, like CLIP's in SD1: ``<bos> words… <eos>`` then padding up to the
fixed context length, so every prompt (the empty one too) is a (context_length,) row and the
U-Net always sees the same number of context tokens. Words outside the grammar become
``<unk>`` rather than an error: "untitled" and gibberish prompts are valid inputs to a sampler.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import torch

from .data import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
DEFAULT_CONTEXT_LENGTH = 16  # every caption is 9 words and 3 commas, plus <bos>/<eos>


class WordTokenizer:
    def __init__(self, words: Sequence[str] | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        words = tuple(vocabulary() if words is None else words) + (",",)
        self.tokens = SPECIALS + words
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("the vocabulary repeats a word")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.context_length = int(context_length)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.ids[t] for t in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def words(self, text: str) -> List[str]:
        return text.lower().replace(",", " , ").split()

    def encode(self, text: str) -> torch.Tensor:
        """int64 (context_length,); raises if the prompt is longer than the context."""
        ids = [self.ids.get(w, self.unk_id) for w in self.words(text)]
        if len(ids) + 2 > self.context_length:
            raise ValueError(
                f"prompt {text!r} has {len(ids)} tokens; at most {self.context_length - 2} fit"
            )
        row = [self.bos_id, *ids, self.eos_id]
        row += [self.pad_id] * (self.context_length - len(row))
        return torch.tensor(row, dtype=torch.int64)

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        rows = [self.encode(t) for t in texts]
        if not rows:
            return torch.zeros(0, self.context_length, dtype=torch.int64)
        return torch.stack(rows)

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            token = self.tokens[int(i)]
            if token == EOS:
                break
            if token not in (BOS, PAD):
                words.append(token)
        return " ".join(words).replace(" ,", ",")
