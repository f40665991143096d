"""Fp32Products: bf16 products computed in fp32 return what torch's bf16 ops return, at least as accurately."""
import pytest
import torch
import torch.nn.functional as F

from qvla_compiler.kernels.bf16_gemms import Fp32Products

bf16 = torch.bfloat16


def _products(gen):
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(bf16)

    mask = torch.rand(2, 1, 7, 13, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees one key
    return {
        "linear 3d": lambda: F.linear(r(3, 7, 45), r(33, 45), r(33)),
        "mm": lambda: r(5, 67) @ r(67, 9),
        "bmm": lambda: torch.bmm(r(4, 6, 31), r(4, 31, 10)),
        "baddbmm": lambda: torch.baddbmm(r(4, 6, 10), r(4, 6, 31), r(4, 31, 10)),
        "conv2d": lambda: F.conv2d(r(2, 3, 17, 17), r(8, 3, 4, 4), r(8), stride=4),
        "sdpa, bool mask": lambda: F.scaled_dot_product_attention(r(2, 3, 7, 16), r(2, 3, 13, 16), r(2, 3, 13, 16),
                                                                  attn_mask=mask),
    }


@pytest.mark.parametrize("name", list(_products(torch.Generator())))
def test_a_bf16_product_in_fp32_matches_torch_bf16_and_is_no_less_accurate(name):
    plain, mode, exact = (_products(torch.Generator().manual_seed(7))[name] for _ in range(3))
    want = plain()
    with Fp32Products() as products:
        got = mode()
    assert products.upcast == 1
    with torch.no_grad():  # the same operands in float64
        torch.set_default_dtype(torch.float64)
        try:
            ref = _exact(exact)
        finally:
            torch.set_default_dtype(torch.float32)
    assert got.dtype == want.dtype == bf16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got.double() - ref).norm() <= (want.double() - ref).norm() * 1.05 + 1e-6


def _exact(make):
    """`make`'s product with every bf16 operand promoted to float64 (the operands themselves are the same values)."""
    class Promote(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            up = torch.utils._pytree.tree_map(
                lambda x: x.double() if isinstance(x, torch.Tensor) and x.dtype == bf16 else x, (args, kwargs or {}))
            return func(*up[0], **up[1])

    with Promote():
        return make().double()


def test_fp32_tensors_and_other_ops_run_unchanged():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 40, generator=gen), torch.randn(40, 5, generator=gen)
    x = a.to(bf16)
    with Fp32Products() as products:
        fp32, summed = a @ b, x + x
    assert products.upcast == 0
    assert torch.equal(fp32, a @ b) and torch.equal(summed, x + x) and summed.dtype == bf16


def test_a_bf16_policy_samples_the_same_actions():
    from qvla_compiler.models import build_policy

    policy = build_policy("groot-tiny", dtype=bf16)
    obs, noise = policy.example_inputs(2), policy.example_noise(2)
    want = policy.sample_actions(**obs, noise=noise)
    with Fp32Products():
        got = policy.sample_actions(**obs, noise=noise)
    assert 0 <= ((got - want).norm() / want.norm()).item() < 0.02  # bf16 rounding differences, compounded


def test_higher_order_operators_pass_through():
    # flex_attention is a higher-order operator: the mode lets it run as it is rather than raise
    from torch.nn.attention.flex_attention import flex_attention

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 8, 16).to(bf16) for _ in range(3))
    gm = torch.export.export(Attend(), (q, k, v)).module()  # as in a captured program: the HOP itself
    want = gm(q, k, v)
    with Fp32Products():
        got = gm(q, k, v)
    torch.testing.assert_close(got, want)


def test_fp32_products_only_where_a_product_may_read_bf16(monkeypatch):
    """A W4 program's bf16 group scales feed qvla:: ops only: no mode (it would cost every op a Python dispatch);
    a bf16 weight read by a linear: the mode."""
    import qvla_compiler
    from qvla_compiler.kernels import bf16_gemms
    from qvla_compiler.models import build_policy

    monkeypatch.setattr(bf16_gemms, "native_bf16", lambda: False)
    policy = build_policy("pi05-tiny")
    qp = qvla_compiler.quantize(policy, policy.example_inputs(2), recipe="w4a8", progress=False)
    graphs = qp.program.graphs.values()
    assert any(b.dtype == bf16 for gm in graphs for b in gm.buffers())  # the group scales
    assert not isinstance(bf16_gemms.fp32_products(*graphs), Fp32Products)
    assert isinstance(bf16_gemms.fp32_products(policy.to(bf16)), Fp32Products)
