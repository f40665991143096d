"""triton_int8_linear vs int64/float64 references on awkward shapes (interpreter on CPU, compiled with CUDA)."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from qvla_compiler.errors import ShapeError  # noqa: E402
from qvla_compiler.kernels import triton_int8_linear as k8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the epilogue rounds acc*xs*ws(+bias) ~3 times (FMA on GPU); fp16/bf16: one final rounding on top of that.
_RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(*shape, seed):
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8).to(DEVICE)


def _operands(m, n, k, seed, lead=None):
    g = _gen(seed + 1)
    xq = _int8(*(lead or (m,)), k, seed=seed)
    w = _int8(n, k, seed=seed + 2)
    x_scale = ((torch.rand(*(lead or (m,)), 1, generator=g) + 0.5) / 127).to(DEVICE)
    w_scale = ((torch.rand(n, generator=g) + 0.5) / 127).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    return xq, x_scale, w, w_scale, bias


def _acc_ref(xq, w):
    return xq.cpu().to(torch.int64) @ w.cpu().to(torch.int64).T


@pytest.mark.parametrize("m", [1, 3, 17, 50])
@pytest.mark.parametrize("n,k", [(100, 200), (37, 70)])
def test_accumulator_exact(m, n, k):
    xq, _, w, _, _ = _operands(m, n, k, seed=m + n + k)
    acc = k8.int8_linear_acc(xq, w)
    assert acc.dtype == torch.int32
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)


def test_accumulator_exact_split_k_and_extremes():
    xq, _, w, _, _ = _operands(5, 24, 4100, seed=3)
    xq[0], w[0] = -128, -128  # 4100 * 16384 = 67,174,400: no int32 overflow, no fp32 rounding allowed
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 4, "SPLIT_K": 3}
    acc = k8.int8_linear_acc(xq, w, config=config)
    torch.testing.assert_close(acc.cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)
    assert acc[0, 0].item() == 4100 * 128 * 128


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_output(out_dtype, with_bias):
    xq, xs, w, ws, bias = _operands(0, 45, 90, seed=7, lead=(2, 9))
    bias = bias if with_bias else None
    out = k8.int8_linear(xq, xs, w, ws, bias, out_dtype)
    ref = k8.int8_linear_ref(xq.cpu(), xs.cpu(), w.cpu(), ws.cpu(), None if bias is None else bias.cpu(),
                             torch.float64)
    assert out.dtype == out_dtype and out.shape == (2, 9, 45)
    atol = 1e-6 * ref.abs().max().item()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=_RTOL[out_dtype], atol=atol)


def test_split_k_path_scaled():
    # M <= 16 and K >= 1024 takes the atomic split-K launch (fp32 partials, then cast)
    xq, xs, w, ws, bias = _operands(3, 40, 1100, seed=9)
    out = k8.int8_linear(xq, xs, w, ws, bias, torch.bfloat16)
    ref = k8.int8_linear_ref(xq.cpu(), xs.cpu(), w.cpu(), ws.cpu(), bias.cpu(), torch.float64)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2**-7, atol=1e-5 * ref.abs().max().item())


def test_matches_cpu_op():
    ops = pytest.importorskip("qvla_compiler.kernels.ops", reason="qvla::int8_linear not defined yet")
    xq, xs, w, ws, bias = _operands(17, 64, 96, seed=13)
    want = ops.int8_linear(xq.cpu(), xs.cpu(), w.cpu(), ws.cpu(), bias.cpu(), torch.float32)
    got = k8.int8_linear(xq, xs, w, ws, bias, torch.float32)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["k_mismatch", "float_x", "w_scale", "x_scale", "bias", "out_dtype"])
def test_shape_errors(bad):
    xq, xs, w, ws, bias = _operands(4, 8, 32, seed=1)
    args = {"xq": xq, "x_scale": xs, "w_q": w, "w_scale": ws, "bias": bias, "out_dtype": torch.float16}
    args.update({
        "k_mismatch": {"w_q": w[:, :31]},
        "float_x": {"xq": xq.float()},
        "w_scale": {"w_scale": ws[:5]},
        "x_scale": {"x_scale": xs[:3]},
        "bias": {"bias": bias[:2]},
        "out_dtype": {"out_dtype": torch.int32},
    }[bad])
    with pytest.raises(ShapeError):
        k8.int8_linear(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autotuned GPU configs)")
@pytest.mark.parametrize("m", [1, 16, 50, 256, 800])
def test_gpu_autotuned_shapes(m):
    xq, xs, w, ws, bias = _operands(m, 2048, 1024, seed=m)
    torch.testing.assert_close(k8.int8_linear_acc(xq, w).cpu().to(torch.int64), _acc_ref(xq, w), rtol=0, atol=0)
    out = k8.int8_linear(xq, xs, w, ws, bias, torch.bfloat16)
    ref = k8.int8_linear_ref(xq.cpu(), xs.cpu(), w.cpu(), ws.cpu(), bias.cpu(), torch.float64)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2**-7, atol=1e-5 * ref.abs().max().item())


def test_register_cuda_kernels_on_a_scratch_namespace():
    from qvla_compiler.kernels import triton_registry

    ns = "qvla_regtest"

    @torch.library.custom_op(f"{ns}::int8_linear", mutates_args=(), device_types="cpu")
    def _cpu_int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        return k8.int8_linear_ref(xq, x_scale, w_q, w_scale, bias, out_dtype)

    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key
    assert not has_cuda(f"{ns}::int8_linear", "CUDA")
    assert triton_registry.register_cuda_kernels(ns) == [f"{ns}::int8_linear"]  # the other two ops do not exist
    assert has_cuda(f"{ns}::int8_linear", "CUDA")
    assert triton_registry.register_cuda_kernels(ns) == [f"{ns}::int8_linear"]  # idempotent
    assert triton_registry.register_cuda_kernels("qvla_no_such_namespace") == []
