"""Triton kernels stay exact past the int32 accumulator bound (launcher K-split) and propagate NaN/Inf like float.
The interpreter is slow, so the split logic runs with a small artificial max_k; one test crosses the real bound
(K = 133,145 at +-127) with a wide BLOCK_K."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from qvla_compiler.errors import AccumulatorOverflowError  # noqa: E402
from qvla_compiler.kernels import triton_int4_linear as k4  # noqa: E402
from qvla_compiler.kernels import triton_int8_linear as k8  # noqa: E402
from qvla_compiler.kernels import triton_quantize_act as qa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 8192, "GROUP_M": 1, "SPLIT_K": 1}  # few interpreter iterations


def _ints(lo, hi, *shape, seed):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8).to(DEVICE)


def _acc_ref(x, w):
    return x.cpu().long() @ w.cpu().long().T


def test_int8_split_k_is_exact_with_a_small_chunk():
    x, w = _ints(-128, 128, 3, 200, seed=1), _ints(-128, 128, 5, 200, seed=2)
    x[0], w[0] = -128, -128
    acc = k8.int8_linear_acc(x, w, max_k=64)  # 4 slices of <= 64, each its own exact int32 launch
    assert acc.dtype == torch.int64
    torch.testing.assert_close(acc.cpu(), _acc_ref(x, w), rtol=0, atol=0)
    xs, ws, b = torch.rand(3, 1).to(DEVICE) / 100, torch.rand(5).to(DEVICE) / 100, torch.randn(5).to(DEVICE)
    out = k8.int8_linear(x, xs, w, ws, b, torch.float32, max_k=64)
    torch.testing.assert_close(out, k8.int8_linear_ref(x, xs, w, ws, b, torch.float32), rtol=0, atol=0)  # f64 epilogue


@pytest.mark.parametrize("k", [133_144, 133_145])
def test_int8_exact_across_the_real_int32_bound(k):
    x = torch.full((1, k), 127, dtype=torch.int8, device=DEVICE)
    w = torch.full((2, k), 127, dtype=torch.int8, device=DEVICE)
    w[1] = -127
    acc = k8.int8_linear_acc(x, w, config=WIDE)
    assert acc.cpu().tolist() == [[k * 16129, -k * 16129]]  # an int32 accumulator would wrap at k = 133,145


@pytest.mark.parametrize("x_packed", [False, True])
def test_int4_raw_accumulator_split_is_exact(x_packed):
    k, group = 301, 32
    x, w = _ints(-8, 8, 4, k, seed=3), _ints(-8, 8, 6, k, seed=4)
    xin = qa.pack_int4_ref(x) if x_packed else x
    acc = k4.int4_linear_acc(xin, qa.pack_int4_ref(w), group, k=k, x_packed=x_packed, max_k=64)
    assert acc.dtype == torch.int64
    torch.testing.assert_close(acc.cpu(), _acc_ref(x, w), rtol=0, atol=0)


def test_int4_refuses_a_group_its_int32_accumulator_cannot_hold():
    x, w = _ints(-128, 128, 2, 200, seed=5), _ints(-8, 8, 3, 200, seed=6)
    wp, xs = qa.pack_int4_ref(w), torch.ones(2, 1, device=DEVICE)
    with pytest.raises(AccumulatorOverflowError, match="group_size <= 32"):
        k4.int4_linear(x, xs, wp, torch.ones(3, 4, device=DEVICE), None, 64, torch.float32, max_k=32)
    out = k4.int4_linear(x, xs, wp, torch.ones(3, 1, device=DEVICE), None, 200, torch.float32, max_k=32)  # per channel
    torch.testing.assert_close(out.cpu(), _acc_ref(x, w).float(), rtol=0, atol=0)  # chunked by 32: still exact


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf * 0, -inf / inf
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [40, 9000])  # single pass (row in registers) and two passes over the row
def test_quantize_act_kernel_poisons_only_non_finite_rows(static, bits, k):
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    x[1, 3], x[3, k - 1] = float("nan"), float("-inf")
    s_static = torch.tensor([0.03], device=DEVICE) if static else None
    q, s = qa.quantize_act(x, bits, s_static)
    q_ref, s_ref = qa.quantize_act_ref(x.cpu(), bits, None if s_static is None else s_static.cpu())
    assert torch.isnan(s[[1, 3]]).all() and torch.isnan(s_ref[[1, 3]]).all()
    good = [0, 2, 4]
    torch.testing.assert_close(s[good].cpu(), s_ref[good], rtol=0, atol=0)
    torch.testing.assert_close(q[good].cpu(), q_ref[good], rtol=0, atol=0)
    if bits == 4:
        _, s_packed = qa.quantize_act_packed_int4(x, s_static)
        assert torch.equal(torch.isnan(s_packed), torch.isnan(s))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf * 0 in the interpreter
def test_linear_kernels_carry_a_nan_scale_into_the_token_outputs():
    x = torch.randn(4, 64).to(DEVICE)
    x[2, 5] = float("inf")
    xq, xs = qa.quantize_act(x, 8, torch.tensor([0.02], device=DEVICE))
    w = _ints(-127, 128, 8, 64, seed=7)
    out8 = k8.int8_linear(xq, xs, w, torch.rand(8).to(DEVICE), None, torch.float32)
    out4 = k4.int4_linear(xq, xs, qa.pack_int4_ref(w.clamp(-8, 7)), torch.rand(8, 2).to(DEVICE), None, 32,
                          torch.float32)
    for out in (out8, out4):
        assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
