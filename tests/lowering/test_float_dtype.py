"""The float part of a program runs in bf16 when asked: linear weights stored in bf16, attention products (two
activations) computed in bf16, output dtypes unchanged, close to fp32; qvla:: integer ops untouched; and on a whole
policy program the action fidelity barely moves."""
import pytest
import torch

from qvla_compiler.lowering.float_dtype import cast_float_part, native_bf16
from qvla_compiler.passes import _graph as g


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_cast_float_linears_stores_bf16_and_keeps_output_dtype():
    m = _Mlp().eval()
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        gm = torch.export.export(m, (x,)).module()
        want = gm(x)
        cast = cast_float_part(gm)
        got = gm(x)
    assert len(cast) == 2
    assert all(p.dtype == torch.bfloat16 for p in gm.parameters())
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert isinstance(native_bf16(), bool)


class _Attention(torch.nn.Module):
    """Three spellings of attention over one projection: explicit matmul + softmax, einsum, and SDPA with a float
    mask; plus a product with a constant operand (x @ W), which is a linear, not attention."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling, self.qkv, self.w = spelling, torch.nn.Linear(32, 96), torch.nn.Parameter(torch.randn(32, 32))

    def forward(self, x, mask):
        q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.spelling == "sdpa":
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.spelling == "einsum":
            p = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 8 ** 0.5 + mask, dim=-1)
            o = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + mask, dim=-1) @ v
        return o.transpose(1, 2).flatten(2) @ self.w


def _cast_to_bf16(node) -> bool:
    operands = g.matmul_operands(node) or node.args[:3]  # a·b, or SDPA's q, k, v
    return all(a.target == torch.ops.aten.to.dtype and a.args[1] == torch.bfloat16 for a in operands)


@pytest.mark.parametrize("spelling", ["matmul", "einsum", "sdpa"])
def test_attention_products_run_in_bf16(spelling):
    m = _Attention(spelling).eval()
    x, mask = torch.randn(2, 5, 32), torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        gm = torch.export.export(m, (x, mask)).module()
        want = gm(x, mask)
        cast_float_part(gm)
        got = gm(x, mask)
    products = [n for n in gm.graph.nodes if g.matmul_operands(n) or g.is_sdpa(n)]
    in_bf16 = [n for n in products if _cast_to_bf16(n)]
    assert len(in_bf16) == (1 if spelling == "sdpa" else 2) and len(products) == len(in_bf16) + 1  # + the x @ W
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert float((got - want).norm() / want.norm()) > 0  # something did run in bf16
    assert gm.w.dtype == torch.float32  # x @ W is a linear with a constant operand: not an attention product


def test_policy_program_fidelity_with_bf16_float_part():
    import qvla_compiler
    from qvla_compiler.models import build_policy

    policy = build_policy("pi05-tiny")
    obs, noise = policy.example_inputs(2), policy.example_noise(2)
    qp = qvla_compiler.quantize(policy, obs, policy.calibration_batches(2), recipe="w8a8", progress=False)
    with torch.no_grad():
        ref = policy.sample_actions(**obs, noise=noise)
        before = qp.module()(*obs.values(), noise)
        n_cast = sum(len(cast_float_part(gm)) for gm in qp.program.graphs.values())
        after = qp.module()(*obs.values(), noise)
    assert n_cast > 0
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    print(f"action rel-L2 vs float: int8 + fp32 float part {rel(before):.4f}, int8 + bf16 float part {rel(after):.4f}")
    assert rel(after) < rel(before) + 0.02
