"""triton_int4_linear (W4A8, W4A4) vs int64/float64 references: odd K, partial last groups, per-channel, split-K."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from qvla_compiler.errors import ShapeError  # noqa: E402
from qvla_compiler.kernels import triton_int4_linear as k4  # noqa: E402
from qvla_compiler.kernels import triton_quantize_act as qa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: per-group fp32 products and sums (a few ulps); fp16/bf16: one final rounding on top.
_RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ints(lo, hi, *shape, seed):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _operands(m, n, k, group_size, seed, x_bits=8):
    g = _gen(seed + 1)
    qmax = 2 ** (x_bits - 1)
    xq = _ints(-qmax, qmax, m, k, seed=seed)
    w = _ints(-8, 8, n, k, seed=seed + 2)  # full two's-complement nibble range, -8 included
    groups = -(-k // group_size)
    x_scale = (torch.rand(m, 1, generator=g) + 0.5) / qmax
    sign = torch.randint(0, 2, (n, groups), generator=g) * 2 - 1  # quantizers._scales stores either sign
    w_scale = ((torch.rand(n, groups, generator=g) + 0.5) / 7 * sign).bfloat16()  # in bf16 (SCALE_DTYPES)
    bias = torch.randn(n, generator=g)
    w_packed = qa.pack_int4_ref(w)
    return [t.to(DEVICE) for t in (xq, x_scale, w, w_packed, w_scale, bias)]


def _acc_ref(xq, w):
    return xq.cpu().to(torch.int64) @ w.cpu().to(torch.int64).T


def test_pack_roundtrip_and_lead_layout():
    w = _ints(-8, 8, 5, 13, seed=0)
    packed = qa.pack_int4_ref(w)
    assert packed.shape == (5, 7) and (packed[:, -1] >> 4 == 0).all()  # odd K: last high nibble is 0
    torch.testing.assert_close(k4.unpack_int4_weight_ref(packed, 13), w, rtol=0, atol=0)
    ops = pytest.importorskip("qvla_compiler.kernels.ops", reason="ops.pack_int4 not defined yet")
    torch.testing.assert_close(ops.pack_int4(w), packed, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 3, 17, 50])
@pytest.mark.parametrize("n,k,group_size", [(100, 129, 32), (37, 77, 64)])
def test_accumulator_exact_w4a8(m, n, k, group_size):
    xq, _, w, w_packed, _, _ = _operands(m, n, k, group_size, seed=m + n + k)
    acc = k4.int4_linear_acc(xq, w_packed, group_size)
    assert acc.dtype == torch.int32
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)


@pytest.mark.parametrize("m,k", [(3, 129), (17, 64)])
def test_accumulator_exact_w4a4_packed_activations(m, k):
    xq, _, w, w_packed, _, _ = _operands(m, 48, k, 32, seed=k, x_bits=4)
    x_packed = qa.pack_int4_ref(xq.cpu()).to(DEVICE)
    acc = k4.int4_linear_acc(x_packed, w_packed, 32, k=k, x_packed=True)
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)


# 48: no BLOCK_K divides it; 33: odd, blocks start mid-byte (fallback unpack); 1100 = K: per-channel chunks
@pytest.mark.parametrize("group_size", [48, 33, 1100])
def test_accumulator_exact_split_k_odd_groups(group_size):
    xq, _, w, w_packed, _, _ = _operands(2, 24, 1100, group_size, seed=group_size)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "SPLIT_K": 3}
    acc = k4.int4_linear_acc(xq, w_packed, group_size, config=config)
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_output(out_dtype, with_bias):
    xq, xs, _, w_packed, ws, bias = _operands(17, 45, 161, 32, seed=5)
    bias = bias if with_bias else None
    out = k4.int4_linear(xq, xs, w_packed, ws, bias, 32, out_dtype)
    ref = k4.int4_linear_ref(xq.cpu(), xs.cpu(), w_packed.cpu(), ws.cpu(), None if bias is None else bias.cpu(),
                             32, torch.float64)
    assert out.dtype == out_dtype and out.shape == (17, 45)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=_RTOL[out_dtype], atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3])
def test_bitplane_weights_run_in_the_int4_kernel(bits):
    # the GPU implementation of qvla::bitplane_linear: bit-planes repacked to nibbles, then this kernel
    from qvla_compiler.kernels import ops

    xq, xs, _, _, ws, bias = _operands(17, 45, 161, 32, seed=bits)
    w = _ints(-2 ** (bits - 1), 2 ** (bits - 1), 45, 161, seed=bits + 7)
    planes = ops.pack_bitplanes(w, bits).to(DEVICE)
    out = k4.bitplane_linear(xq, xs, planes, ws, bias, bits, 32, torch.float32)
    ref = ops.bitplane_linear_ref(xq.cpu(), xs.cpu(), planes.cpu(), ws.cpu(), bias.cpu(), bits, 32, torch.float64)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=_RTOL[torch.float32], atol=1e-6 * ref.abs().max().item())


def test_split_k_path_scaled_three_d():
    # M <= 16, K >= 1024, several groups: the atomic split-K launch; activations [2, 3, K]
    xq, xs, _, w_packed, ws, bias = _operands(6, 40, 1031, 128, seed=8)
    xq3, xs3 = xq.reshape(2, 3, 1031), xs.reshape(2, 3, 1)
    out = k4.int4_linear(xq3, xs3, w_packed, ws, bias, 128, torch.bfloat16)
    ref = k4.int4_linear_ref(xq.cpu(), xs.cpu(), w_packed.cpu(), ws.cpu(), bias.cpu(), 128, torch.float64)
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(out.reshape(6, 40).cpu().double(), ref, rtol=2**-7, atol=1e-5 * ref.abs().max().item())


def test_w4a4_end_to_end_packed_equals_unpacked():
    g = _gen(31)
    x = torch.randn(5, 130, generator=g).to(DEVICE)
    _, _, _, w_packed, ws, bias = _operands(5, 36, 130, 64, seed=31)
    xq, xs = qa.quantize_act(x, 4)
    x_packed, xs_p = qa.quantize_act_packed_int4(x)
    out = k4.int4_linear(xq, xs, w_packed, ws, bias, 64, torch.float32)
    out_p = k4.int4_linear_packed_act(x_packed, xs_p, w_packed, ws, bias, 64, torch.float32, k=130)
    ref = k4.int4_linear_ref(xq.cpu(), xs.cpu(), w_packed.cpu(), ws.cpu(), bias.cpu(), 64, torch.float64)
    torch.testing.assert_close(out_p, out, rtol=0, atol=0)  # same int math, same fp32 epilogue order
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_matches_cpu_op():
    ops = pytest.importorskip("qvla_compiler.kernels.ops", reason="qvla::int4_linear not defined yet")
    xq, xs, _, w_packed, ws, bias = _operands(17, 64, 129, 32, seed=13)
    want = ops.int4_linear(xq.cpu(), xs.cpu(), w_packed.cpu(), ws.cpu(), bias.cpu(), 32, torch.float32)
    got = k4.int4_linear(xq, xs, w_packed, ws, bias, 32, torch.float32)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["packed_width", "w_scale_groups", "x_dtype", "group_size", "x_scale", "packed_act"])
def test_shape_errors(bad):
    xq, xs, _, w_packed, ws, bias = _operands(4, 8, 64, 32, seed=2)
    with pytest.raises(ShapeError):
        if bad == "packed_width":
            k4.int4_linear(xq, xs, w_packed[:, :31], ws, bias, 32, torch.float16)
        elif bad == "w_scale_groups":
            k4.int4_linear(xq, xs, w_packed, ws[:, :1], bias, 32, torch.float16)
        elif bad == "x_dtype":
            k4.int4_linear(xq.float(), xs, w_packed, ws, bias, 32, torch.float16)
        elif bad == "group_size":
            k4.int4_linear(xq, xs, w_packed, ws, bias, 0, torch.float16)
        elif bad == "x_scale":
            k4.int4_linear(xq, xs[:2], w_packed, ws, bias, 32, torch.float16)
        else:
            k4.int4_linear_packed_act(xq, xs, w_packed, ws, bias, 32, torch.float16, k=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autotuned GPU configs)")
@pytest.mark.parametrize("m", [1, 16, 50, 256, 800])
@pytest.mark.parametrize("group_size", [128, 2048])
def test_gpu_autotuned_shapes(m, group_size):
    xq, xs, w, w_packed, ws, bias = _operands(m, 1024, 2048, group_size, seed=m)
    acc = k4.int4_linear_acc(xq, w_packed, group_size)
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)
    out = k4.int4_linear(xq, xs, w_packed, ws, bias, group_size, torch.bfloat16)
    ref = k4.int4_linear_ref(xq.cpu(), xs.cpu(), w_packed.cpu(), ws.cpu(), bias.cpu(), group_size, torch.float64)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2**-7, atol=1e-5 * ref.abs().max().item())
