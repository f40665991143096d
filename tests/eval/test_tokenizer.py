import pytest
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tabletop import COLOURS, FAMILIES, SHAPES, TEMPLATES, TabletopEnv
from qvla_compiler.eval.tokenizer import MAX_TOKENS, VOCAB, VOCAB_SIZE, Tokenizer, default_tokenizer


def test_round_trip_over_generated_instructions():
    tok = default_tokenizer()
    texts = [TabletopEnv(f, s).instruction for f in FAMILIES for s in range(20)]
    tokens, mask = tok.encode_batch(texts)
    assert tokens.shape == mask.shape == (len(texts), MAX_TOKENS)
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert int(tokens.max()) < VOCAB_SIZE
    assert not (tokens == tok.unk_id).any()
    for text, ids, m in zip(texts, tokens, mask):
        assert tok.decode(ids, m) == text
        assert tok.decode(ids) == text


def test_every_template_fits_max_tokens_with_one_pad():
    # MAX_TOKENS is kept tight (pad tokens cost backbone compute); a longer template must grow it deliberately
    colours = list(COLOURS)  # every colour and shape is one word
    fill = {"c1": colours[0], "c2": colours[1], "s1": SHAPES[0], "s2": SHAPES[1]}
    longest = max(len(t.format(**fill).split()) for ts in TEMPLATES.values() for t in ts)
    assert longest == MAX_TOKENS - 1


def test_padding_and_mask():
    tok = Tokenizer(max_len=8)
    ids, mask = tok.encode("Reach the RED circle.")
    assert ids[4:] == [0] * 4 and mask == [True] * 4 + [False] * 4
    assert [VOCAB[i] for i in ids[:4]] == ["reach", "the", "red", "circle"]
    assert VOCAB[0] == "<pad>" and VOCAB[1] == "<unk>"


def test_unknown_and_too_long():
    tok = Tokenizer()
    ids, _ = tok.encode("reach the pink circle")
    assert ids[2] == tok.unk_id
    with pytest.raises(QvlaError):
        Tokenizer(strict=True).encode("reach the pink circle")
    with pytest.raises(QvlaError):
        Tokenizer(max_len=3).encode("reach the red circle")
    tokens, mask = tok.encode_batch([])
    assert tokens.shape == (0, MAX_TOKENS)
