"""fold_shared_kv: attention over key/value heads repeated across query heads becomes attention over the shared
heads with the queries stacked, the same values; other head layouts stay as they are."""
import pytest
import torch
import torch.nn.functional as F

from qvla_compiler.lowering.fold_shared_kv import fold_shared_kv
from qvla_compiler.lowering.fuse_attention import fuse_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default
EXPAND = torch.ops.aten.expand.default
B, H, L, S, D = 3, 8, 5, 7, 16
DYNAMIC_BATCH = torch.export.Dim("batch")


class Attention(torch.nn.Module):
    """k, v: B×2×S×D, each of the 2 heads shared by 4 query heads, written the ways real models write it."""

    def __init__(self, form, causal=False):
        super().__init__()
        self.form, self.causal = form, causal

    def forward(self, q, k, v, mask):
        gqa = self.form == "enable_gqa"
        if self.form == "mqa_expand":  # pi0.5's action expert: one head, broadcast
            k, v = k[:, :1].expand(-1, H, -1, -1), v[:, :1].expand(-1, H, -1, -1)
        elif self.form == "repeat_kv":  # transformers: head h reads key head h // 4
            k, v = (t[:, :, None].expand(-1, 2, H // 2, S, D).reshape(t.shape[0], H, S, D) for t in (k, v))
        elif self.form == "heads_last":  # SmolVLA: repeat_kv on B×S×Hkv×D, then the heads moved second
            k, v = (t.transpose(1, 2)[:, :, :, None].expand(-1, S, 2, H // 2, D).reshape(t.shape[0], S, H, D)
                    for t in (k, v))
            k, v = k.to(torch.float32).transpose(1, 2), v.permute(0, 2, 1, 3)
        elif self.form == "heads_last tiled":  # as SmolVLA, but head h reads key head h % 2: left alone
            k, v = (t.transpose(1, 2)[:, :, None].expand(-1, S, H // 2, 2, D).reshape(t.shape[0], S, H, D)
                    for t in (k, v))
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        elif self.form == "repeat_interleave":
            k, v = k.repeat_interleave(H // 2, dim=1), v.repeat_interleave(H // 2, dim=1)
        elif self.form == "batch broadcast":  # one k/v for the whole batch: its batch is expanded too
            k, v = k[:1, :1].expand(q.shape[0], H, -1, -1), v[:1, :1].expand(q.shape[0], H, -1, -1)
        elif self.form == "tiled":  # head h reads key head h % 2: a different grouping, left alone
            k, v = (t[:, None].expand(-1, H // 2, 2, S, D).reshape(t.shape[0], H, S, D) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=gqa)


def _inputs(mask_rows):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, 2, S, D, generator=gen), \
        torch.randn(B, 2, S, D, generator=gen)
    if mask_rows is None:
        return q, k, v, None
    mask = torch.randn(B, 1, mask_rows, S, generator=gen)
    mask[0, ..., :3] = float("-inf")  # some keys dropped
    return q, k, v, mask


def _exported(module, args, dynamic=False):
    shapes = None
    if dynamic:
        shapes = tuple(None if a is None else {0: DYNAMIC_BATCH} for a in args)
    return torch.export.export(module, args, dynamic_shapes=shapes).module()


@pytest.mark.parametrize("form", ["mqa_expand", "repeat_kv", "heads_last", "repeat_interleave", "enable_gqa"])
@pytest.mark.parametrize("mask_rows", [None, 1, L])
def test_shared_heads_fold_to_the_same_values(form, mask_rows):
    args = _inputs(mask_rows)
    gm = _exported(Attention(form), args, dynamic=True)
    want = gm(*args)
    assert fold_shared_kv(gm) == 1
    (sdpa,) = gm.graph.find_nodes(op="call_function", target=SDPA)
    kv_heads = 1 if form == "mqa_expand" else 2
    assert sdpa.args[0].meta["val"].shape[1:] == (kv_heads, H // kv_heads * L, D)  # each group's queries stacked
    assert not gm.graph.find_nodes(op="call_function", target=EXPAND)  # no repeat is written out any more
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)
    smaller = tuple(None if a is None else a[:2] for a in args)  # the batch stays dynamic
    torch.testing.assert_close(gm(*smaller), want[:2], rtol=0, atol=0)


@pytest.mark.parametrize("form,causal,mask_heads", [("tiled", False, 1), ("heads_last tiled", False, 1), ("repeat_kv", True, None),
                                                    ("repeat_kv", False, H), ("batch broadcast", False, 1)])
def test_other_layouts_stay(form, causal, mask_heads):
    """Keys grouped another way, causal attention (the stacked rows would see other rows' positions), a mask that
    differs per head, and keys broadcast over the batch too are not rewritten."""
    q, k, v, _ = _inputs(None)
    mask = None if mask_heads is None else torch.randn(B, mask_heads, L, S)
    gm = _exported(Attention(form, causal), (q, k, v, mask))
    assert fold_shared_kv(gm) == 0


def test_after_fuse_attention_and_under_inductor():
    """The SDPA that fuse_attention writes (pi05's explicit softmax attention) folds too, and Inductor compiles the
    folded graph to the eager values."""
    from tests.lowering.test_fuse_attention import Attention as Explicit, _inputs as explicit_inputs
    args = explicit_inputs()
    gm = torch.export.export(Explicit(), args).module()
    want = gm(*args)
    assert fuse_attention(gm) == 1 and fold_shared_kv(gm) == 1
    torch.testing.assert_close(gm(*args), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.compile(gm)(*args), want, rtol=1e-5, atol=1e-5)
