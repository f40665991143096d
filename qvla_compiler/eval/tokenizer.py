"""Word-level tokenizer over the tabletop template vocabulary.

Ids: 0 = ``<pad>``, 1 = ``<unk>``, then the template words in sorted order,
so the vocabulary is stable as long as the templates, colours and shapes are.
Sequences are right-padded to ``max_len``; the mask is True on real tokens.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tabletop import COLOURS, SHAPES, TEMPLATES

__all__ = ["PAD", "UNK", "MAX_TOKENS", "VOCAB", "VOCAB_SIZE", "Tokenizer", "default_tokenizer"]

PAD, UNK = "<pad>", "<unk>"
MAX_TOKENS = 10  # the longest template is 9 words; every pad token costs backbone compute

_WORD = re.compile(r"[a-z0-9]+")


def _template_words() -> list[str]:
    words: set[str] = set(COLOURS) | set(SHAPES)
    for templates in TEMPLATES.values():
        for t in templates:
            for w in t.split():
                if not w.startswith("{"):
                    words.add(w)
    return sorted(words)


VOCAB: tuple[str, ...] = (PAD, UNK, *_template_words())
VOCAB_SIZE = len(VOCAB)


class Tokenizer:
    def __init__(self, max_len: int = MAX_TOKENS, vocab: Sequence[str] = VOCAB, strict: bool = False):
        if max_len < 1:
            raise QvlaError(f"max_len must be >= 1, got {max_len}")
        if len(vocab) < 2 or vocab[0] != PAD or vocab[1] != UNK:
            raise QvlaError(f"vocab must start with {PAD!r}, {UNK!r}")
        self.max_len = int(max_len)
        self.vocab = tuple(vocab)
        self.strict = strict
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> tuple[list[int], list[bool]]:
        words = self.words(text)
        if len(words) > self.max_len:
            raise QvlaError(f"instruction has {len(words)} words but max_len is {self.max_len}: "
                            f"{text!r}; build Tokenizer(max_len=...) larger")
        ids = []
        for w in words:
            i = self.index.get(w)
            if i is None:
                if self.strict:
                    raise QvlaError(f"word {w!r} of {text!r} is not in the vocabulary; "
                                    f"use Tokenizer(strict=False) to map it to {UNK}")
                i = self.unk_id
            ids.append(i)
        n = len(ids)
        return ids + [self.pad_id] * (self.max_len - n), [True] * n + [False] * (self.max_len - n)

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens int64 [B, max_len], token_mask bool [B, max_len]."""
        ids, masks = zip(*(self.encode(t) for t in texts)) if len(texts) else ((), ())
        tokens = torch.tensor(list(ids), dtype=torch.int64).reshape(len(texts), self.max_len)
        mask = torch.tensor(list(masks), dtype=torch.bool).reshape(len(texts), self.max_len)
        return tokens, mask

    def decode(self, ids, mask=None) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if mask is None:
            keep = [i != self.pad_id for i in ids]
        else:
            keep = [bool(m) for m in (mask.tolist() if hasattr(mask, "tolist") else mask)]
        out = []
        for i, k in zip(ids, keep):
            if not k:
                continue
            if not 0 <= i < len(self.vocab):
                raise QvlaError(f"token id {i} is outside the vocabulary (size {len(self.vocab)})")
            out.append(self.vocab[i])
        return " ".join(out)


@lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
    return Tokenizer()
