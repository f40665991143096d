"""fuse_attention: explicit softmax attention becomes one SDPA with the same values (fully masked rows included);
forms it cannot rewrite exactly stay as they are."""
import math

import pytest
import torch

from qvla_compiler.lowering.fuse_attention import fuse_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default
MIN = torch.finfo(torch.float32).min


class Attention(torch.nn.Module):
    """pi05 / LeRobot π0 style: one key/value head broadcast to every query head (MQA), softmax in fp32."""

    def __init__(self, form="masked_fill", fill=MIN, dim=-1, dtype=torch.float32, softmax_dtype=torch.float32,
                 softmax_out=None):
        super().__init__()
        self.form, self.fill, self.dim, self.dtype, self.softmax_dtype = form, fill, dim, dtype, softmax_dtype
        self.softmax_out = softmax_out

    def forward(self, q, k, v, mask):
        k, v = k.to(self.dtype).expand(-1, q.shape[1], -1, -1), v.to(self.dtype).expand(-1, q.shape[1], -1, -1)
        q = q.to(self.dtype)
        if self.form == "divide":
            s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        keep = mask[:, None, None, :]
        if self.form == "where":
            s = torch.where(keep, s, self.fill)
        elif self.form == "cast where":  # SmolVLA: the scores cast to fp32 (a no-op here) inside the where
            s = torch.where(keep, s.to(torch.float32), self.fill)
        elif self.form == "additive":  # transformers' eager attention (LeRobot 0.6.1's π0 / π0.5)
            s = s + torch.where(keep, 0.0, self.fill)
        elif self.form == "subtracted":  # add(s, w, alpha=-1): the dropped scores pushed up, not down
            s = torch.add(s, torch.where(keep, 0.0, self.fill), alpha=-1)
        elif self.form == "drop":
            s = s.masked_fill(mask[:, None, None, :] == 0, self.fill)  # the positions to drop, not to keep
        else:
            s = s.masked_fill(~keep, self.fill)
        p = torch.softmax(s.to(self.softmax_dtype), dim=self.dim, dtype=self.softmax_out).type_as(q)
        return torch.matmul(p, v).float()


def _inputs(batch=3, heads=4, lq=5, lk=7, d=16):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((batch, heads, lq, d), (batch, 1, lk, d),
                                                                 (batch, 1, lk, d)))
    mask = torch.rand(batch, lk, generator=gen) > 0.4
    mask[0, 0] = True
    mask[1] = False  # a fully masked row: uniform weights in the original
    return q, k, v, mask


def _sdpa_count(gm):
    return len(gm.graph.find_nodes(op="call_function", target=SDPA))


@pytest.mark.parametrize("form", ["masked_fill", "where", "cast where", "additive", "drop", "divide"])
def test_explicit_attention_becomes_sdpa_with_the_same_values(form):
    args = _inputs()
    gm = torch.export.export(Attention(form), args).module()
    want = gm(*args)
    assert fuse_attention(gm) == 1 and _sdpa_count(gm) == 1
    for old in (torch.ops.aten.softmax.int, torch.ops.aten.masked_fill.Scalar, torch.ops.aten.where.ScalarOther):
        assert not gm.graph.find_nodes(op="call_function", target=old), old  # the replaced chain is gone
    got = gm(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], args[2][1].expand(4, 7, 16).mean(1, keepdim=True).expand(4, 5, 16),
                               rtol=1e-5, atol=1e-6)  # fully masked: the mean of the values, as before


class CachedKeys(torch.nn.Module):
    """SmolVLA's cross-attention to its prefix: the keys arrive transposed (their transpose hoisted into the prefix)."""

    def forward(self, q, kt, v, mask):
        s = torch.matmul(q, kt) * q.shape[-1] ** -0.5
        s = torch.where(mask[:, None, None, :], s.to(torch.float32), MIN)
        return torch.matmul(torch.softmax(s, dim=-1), v)


def test_keys_that_arrive_transposed_are_transposed_back_as_a_view():
    q, k, v, mask = _inputs()
    kt, v = k.expand(-1, 4, -1, -1).transpose(-1, -2).contiguous(), v.expand(-1, 4, -1, -1).contiguous()
    gm = torch.export.export(CachedKeys(), (q, kt, v, mask)).module()
    want = gm(q, kt, v, mask)
    assert fuse_attention(gm) == 1 and _sdpa_count(gm) == 1
    sdpa = gm.graph.find_nodes(op="call_function", target=SDPA)[0]
    assert sdpa.args[1].target is torch.ops.aten.transpose.int and sdpa.args[1].args[0].op == "placeholder"
    torch.testing.assert_close(gm(q, kt, v, mask), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", [Attention(fill=-1e9), Attention("additive", fill=-1e9), Attention("subtracted"),
                                    Attention(dim=-2), Attention(dtype=torch.bfloat16),
                                    Attention(softmax_dtype=torch.bfloat16), Attention(softmax_out=torch.bfloat16)],
                         ids=["fill -1e9 (not absorbing)", "additive -1e9", "additive, alpha -1",
                              "softmax over queries", "bf16", "softmax in bf16", "softmax(dtype=bf16) on fp32 scores"])
def test_forms_it_cannot_rewrite_exactly_stay(module):
    gm = torch.export.export(module, _inputs()).module()
    before = gm.code
    assert fuse_attention(gm) == 0 and gm.code == before


def test_compile_program_runs_the_fused_copy_and_leaves_the_program_alone():
    from qvla_compiler.kernels.inductor import compile_program

    args = _inputs()
    gm = torch.export.export(Attention(), args).module()
    with torch.no_grad():
        want = gm(*args)
        compiled = compile_program(gm)
        got = compiled(*args)
    assert _sdpa_count(compiled.module) == 1 and _sdpa_count(gm) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
