"""qvla:: CPU ops against their pure-torch references on awkward shapes; exact integer accumulation."""
import pytest
import torch

from qvla_compiler.errors import ShapeError
from qvla_compiler.kernels import ops

SHAPES = [(1, 7, 5), (3, 33, 17), (17, 64, 40), (50, 129, 3)]  # (M, K, N): never block multiples


def _int8(*shape, lo=-127, hi=128):
    return torch.randint(lo, hi, shape, dtype=torch.int8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 5), (2, 3, 17), (50, 129)])
def test_quantize_act_matches_reference_and_range(bits, shape):
    x = torch.randn(shape) * 3
    q, s = ops.quantize_act(x, bits, None)
    rq, rs = ops.quantize_act_ref(x, bits)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert q.abs().max() == ops.qmax_for(bits)  # the absmax element lands exactly on the grid's end
    assert (q.float() * s - x).abs().max() <= s.max() / 2 + 1e-6


def test_quantize_act_static_scale_clamps():
    x = torch.randn(4, 9) * 10
    q, s = ops.quantize_act(x, 8, torch.tensor([0.01]))
    assert s.shape == (4, 1) and q.abs().max() == 127


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_accumulates_exactly_in_int32(m, k, n):
    xq, wq = _int8(m, k), _int8(n, k)
    ones_x, ones_w = torch.ones(m, 1), torch.ones(n)
    out = ops.int8_linear(xq, ones_x, wq, ones_w, None, torch.float64)
    exact = xq.long() @ wq.long().t()
    assert torch.equal(out.long(), exact)  # |acc| < 2**24 here, so fp32 holds the int32 sum exactly


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_reference(m, k, n, dtype):
    xq, xs = ops.quantize_act(torch.randn(2, m, k), 8, None)
    wq, ws, b = _int8(n, k), torch.rand(n) / 100, torch.randn(n)
    out = ops.int8_linear(xq, xs, wq, ws, b, dtype)
    ref = ops.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)
    assert out.dtype == dtype and out.shape == (2, m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp32 epilogue rounding; bf16 output rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
def test_int4_pack_roundtrip(k):
    w = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = ops.pack_int4(w)
    assert packed.shape == (5, (k + 1) // 2)
    assert torch.equal(ops.unpack_int4(packed, k), w)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("group", [16, 128, -1])
@pytest.mark.parametrize("a_bits", [8, 4])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])  # bf16: what quantize_weight stores
def test_int4_linear_matches_reference(m, k, n, group, a_bits, scale_dtype):
    xq, xs = ops.quantize_act(torch.randn(m, k), a_bits, None)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # every level quantize_weight uses
    gs = k if group == -1 else group
    ws = ((torch.rand(n, -(-k // gs)) - 0.5) / 5).to(scale_dtype)  # either sign, as quantizers._scales stores
    out = ops.int4_linear(xq, xs, ops.pack_int4(w), ws, None, gs, torch.float32)
    ref = ops.int4_linear_ref(xq, xs, ops.pack_int4(w), ws, None, gs, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 64, 129])
def test_bitplane_pack_roundtrip_full_range(bits, k):
    w = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (5, k), dtype=torch.int8)
    planes = ops.pack_bitplanes(w, bits)
    assert planes.shape == (5, bits, -(-k // 8)) and planes.dtype == torch.uint8  # bits / 8 bytes a weight
    assert torch.equal(ops.unpack_bitplanes(planes, bits, k), w)


def test_bitplane_layout_is_the_documented_one():
    # weight 8j + i holds bit p of its offset code in bit i of byte j of plane p: 3-bit, code = w + 4
    w = torch.tensor([[-4, 3, 0, -1, 1, 2, -3, -2, 3]], dtype=torch.int8)  # codes 0 7 4 3 5 6 1 2 | 7
    planes = ops.pack_bitplanes(w, 3)
    codes = [0, 7, 4, 3, 5, 6, 1, 2]
    for p in range(3):
        assert planes[0, p, 0] == sum(((c >> p) & 1) << i for i, c in enumerate(codes))
        assert planes[0, p, 1] == 1  # the ninth weight (code 7) sets bit 0 of the second byte in every plane


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bits,group", [(3, 16), (3, -1), (2, 32), (2, 128)])
@pytest.mark.parametrize("a_bits", [8, 4])
def test_bitplane_linear_matches_reference(m, k, n, bits, group, a_bits):
    xq, xs = ops.quantize_act(torch.randn(m, k), a_bits, None)
    w = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n, k), dtype=torch.int8)
    gs = k if group == -1 else group
    ws, b = ((torch.rand(n, -(-k // gs)) - 0.5) / 5).bfloat16(), torch.randn(n)  # scales of either sign
    planes = ops.pack_bitplanes(w, bits)
    out = ops.bitplane_linear(xq, xs, planes, ws, b, bits, gs, torch.float32)
    ref = ops.bitplane_linear_ref(xq, xs, planes, ws, b, bits, gs, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the same integers through the int4 format give the same numbers: one grouped kernel behind both
    assert torch.equal(out, ops.int4_linear(xq, xs, ops.pack_int4(w), ws, b, gs, torch.float32))


def test_int4_linear_group_accumulation_is_exact():
    m, k, n, gs = 3, 70, 4, 32
    xq, w = _int8(m, k), torch.randint(-7, 8, (n, k), dtype=torch.int8)
    scales = torch.tensor([[1.0, 2.0, 4.0]]).expand(n, 3).contiguous()  # powers of two: exact in fp32
    out = ops.int4_linear(xq, torch.ones(m, 1), ops.pack_int4(w), scales, None, gs, torch.float64)
    x64, w64 = xq.long(), w.long()
    exact = sum(x64[:, s:s + gs] @ w64[:, s:s + gs].t() * f for s, f in ((0, 1), (32, 2), (64, 4)))
    assert torch.equal(out.long(), exact)


def test_ops_pass_opcheck():
    xq, xs = ops.quantize_act(torch.randn(3, 10), 8, None)
    torch.library.opcheck(torch.ops.qvla.quantize_act.default, (torch.randn(3, 10), 8, None))
    torch.library.opcheck(torch.ops.qvla.int8_linear.default, (xq, xs, _int8(6, 10), torch.rand(6), None, torch.float32))
    w = ops.pack_int4(torch.randint(-7, 8, (6, 10), dtype=torch.int8))
    torch.library.opcheck(torch.ops.qvla.int4_linear.default, (xq, xs, w, torch.rand(6, 1), None, 128, torch.float32))
    planes = ops.pack_bitplanes(torch.randint(-4, 4, (6, 10), dtype=torch.int8), 3)
    torch.library.opcheck(torch.ops.qvla.bitplane_linear.default,
                          (xq, xs, planes, torch.rand(6, 2), None, 3, 8, torch.float32))


def test_bad_inputs_raise_shape_error():
    xq, xs = ops.quantize_act(torch.randn(3, 10), 8, None)
    with pytest.raises(ShapeError, match="K=10"):
        ops.int8_linear(xq, xs, _int8(6, 11), torch.rand(6), None, torch.float32)
    with pytest.raises(ShapeError, match="int8"):
        ops.int8_linear(xq.float(), xs, _int8(6, 10), torch.rand(6), None, torch.float32)
    with pytest.raises(ShapeError, match="4 or 8"):
        ops.quantize_act(torch.randn(3, 10), 6, None)
    planes = ops.pack_bitplanes(torch.zeros(6, 10, dtype=torch.int8), 3)
    for bits in (2, 5):  # planes of another width; a width the GPU's int4 repack cannot hold
        with pytest.raises(ShapeError, match=f"2- or 3-bit weights .* got bits={bits} and torch.uint8 \\(6, 3, 2\\)"):
            ops.bitplane_linear(xq, xs, planes, torch.rand(6, 1), None, bits, 16, torch.float32)
    with pytest.raises(ShapeError, match="K=17 but the weight expects K=16"):
        xq17, xs17 = ops.quantize_act(torch.randn(3, 17), 8, None)
        ops.bitplane_linear(xq17, xs17, planes, torch.rand(6, 1), None, 3, 16, torch.float32)
