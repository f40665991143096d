"""Exact integer GEMMs on the CPU for every shape and every K: awkward shapes, oneDNN's layout rule, int32 overflow."""
import pytest
import torch

from qvla_compiler.kernels import cpu_gemm, ops

BACKENDS = ["int_mm", "fp32_exact"]
INT32_MAX = 2**31 - 1


@pytest.fixture
def cpu_backend(monkeypatch):
    """Run the qvla:: ops on one CPU GEMM backend (the op reads cpu_gemm.backend(), cached per process)."""
    def use(which):
        monkeypatch.setenv("QVLA_CPU_GEMM", which)
        cpu_gemm.backend.cache_clear()
    yield use
    monkeypatch.delenv("QVLA_CPU_GEMM", raising=False)
    cpu_gemm.backend.cache_clear()


def _oneDNN_like_int_mm(real):
    """torch._int_mm as it behaves on AVX512-VNNI/AMX CPUs: an operand whose leading dimension oneDNN rejects leaves
    the output uninitialised. This CPU (AVX2) takes ATen's strided loop instead, which handles every layout."""
    def fake(a, b):
        if not (cpu_gemm.blas_layout_ok(a) and cpu_gemm.blas_layout_ok(b)):
            return torch.full((a.shape[0], b.shape[1]), -12345, dtype=torch.int32)
        return real(a, b)
    return fake


# ---------------------------------------------------------------------------------------------------------------
# awkward shapes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 127])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_int8_linear_every_small_shape(which, k, n, cpu_backend, monkeypatch):
    cpu_backend(which)
    monkeypatch.setattr(torch, "_int_mm", _oneDNN_like_int_mm(torch._int_mm))
    for m in (0, 1, 17):
        xq, wq = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (n, k), dtype=torch.int8)
        acc = cpu_gemm.int_matmul(xq, wq)
        torch.testing.assert_close(acc.long(), cpu_gemm.int_matmul_ref(xq, wq), rtol=0, atol=0)
        ones = ops.int8_linear(xq, torch.ones(m, 1), wq, torch.ones(n), None, torch.float64)
        torch.testing.assert_close(ones, ops.int8_linear_ref(xq, torch.ones(m, 1), wq, torch.ones(n), None,
                                                             torch.float64), rtol=0, atol=0)
        xs, ws, b = torch.rand(m, 1) / 100 + 1e-3, torch.rand(n) / 100 + 1e-3, torch.randn(n)
        out = ops.int8_linear(xq, xs, wq, ws, b, torch.float32)
        ref = ops.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)
        # fp32 epilogue: exact acc, two products and a bias add, each rounded once: <= 3 * 2**-24 of the largest term
        scaled = (acc.double() * xs.double() * ws.double()).abs().amax() if m else torch.tensor(0.0)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-7 * (scaled.item() + b.abs().max().item()))


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 127])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_int4_linear_every_small_shape(which, k, n, cpu_backend, monkeypatch):
    cpu_backend(which)
    monkeypatch.setattr(torch, "_int_mm", _oneDNN_like_int_mm(torch._int_mm))
    for m in (0, 1, 17):
        xq, w = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-8, 8, (n, k), dtype=torch.int8)
        wp = ops.pack_int4(w)
        for group in (k, 2 if k < 8 else 32):  # one group per row (int_matmul) and several (grouped accumulators)
            groups = -(-k // group)
            ones = ops.int4_linear(xq, torch.ones(m, 1), wp, torch.ones(n, groups), None, group, torch.float64)
            ref = ops.int4_linear_ref(xq, torch.ones(m, 1), wp, torch.ones(n, groups), None, group, torch.float64)
            torch.testing.assert_close(ones, ref, rtol=0, atol=0)
            torch.testing.assert_close(ref.long(), xq.long() @ w.long().t(), rtol=0, atol=0)
            xs, ws = torch.rand(m, 1) / 100 + 1e-3, torch.rand(n, groups) / 100 + 1e-3
            out = ops.int4_linear(xq, xs, wp, ws, None, group, torch.float32)
            ref = ops.int4_linear_ref(xq, xs, wp, ws, None, group, torch.float64)
            torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)  # fp32 sum of <= 64 scaled groups


@pytest.mark.parametrize("which", BACKENDS)
def test_non_contiguous_and_stride_zero_operands(which, cpu_backend, monkeypatch):
    cpu_backend(which)
    monkeypatch.setattr(torch, "_int_mm", _oneDNN_like_int_mm(torch._int_mm))
    a = torch.randint(-128, 128, (1, 40), dtype=torch.int8).as_strided((1, 40), (0, 1))  # inductor-style stride 0
    w = torch.randint(-128, 128, (5, 80), dtype=torch.int8)[:, ::2]  # every other column
    at = torch.randint(-128, 128, (40, 3), dtype=torch.int8).t()  # column-major activations
    for x in (a, at):
        torch.testing.assert_close(cpu_gemm.int_matmul(x, w).long(), cpu_gemm.int_matmul_ref(x, w), rtol=0, atol=0)


def test_blas_layout_rule_names_the_measured_bug():
    """A [N, 1] weight's transpose has strides (1, 1): oneDNN reads it row-major with ldb = 1 < N (the 5e4 error)."""
    w = torch.zeros(16, 1, dtype=torch.int8)
    assert w.t().stride() == (1, 1) and not cpu_gemm.blas_layout_ok(w.t())
    assert not cpu_gemm.blas_layout_ok(torch.zeros(1, 8, dtype=torch.int8).as_strided((1, 8), (0, 1)))
    assert cpu_gemm.blas_layout_ok(torch.zeros(16, 8, dtype=torch.int8).t())  # the usual [N, K] weight, K > 1
    for k in range(1, 41):
        for n in range(1, 41):
            a, b = cpu_gemm._blas_operands(torch.zeros(3, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8))
            assert cpu_gemm.blas_layout_ok(a) and cpu_gemm.blas_layout_ok(b), (k, n)


# ---------------------------------------------------------------------------------------------------------------
# int32 overflow: K around 2**31 / 127**2 (and 2**31 / 128**2), tiny M and N
# ---------------------------------------------------------------------------------------------------------------
K_127 = INT32_MAX // (127 * 127)  # 133,144: the last K whose sum of 127 * 127 products fits int32


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("k", [K_127, K_127 + 1, 2 * K_127 + 5])
def test_overflow_boundary_127(which, k):
    a = torch.full((2, k), 127, dtype=torch.int8)
    a[1] = -127
    b = torch.full((2, k), 127, dtype=torch.int8)
    b[1, ::3] = -127
    got = cpu_gemm.int_matmul(a, b, which)
    torch.testing.assert_close(got.long(), cpu_gemm.int_matmul_ref(a, b), rtol=0, atol=0)
    assert got[0, 0].item() == k * 127 * 127 and got[1, 0].item() == -k * 127 * 127  # no sign flip either way
    assert got.dtype == (torch.int32 if k <= cpu_gemm.max_exact_k() else torch.int64)


@pytest.mark.parametrize("which", BACKENDS)
def test_overflow_boundary_minus_128(which):
    """-128 * -128 * 131,072 = 2**31 exactly: one past int32; 131,071 terms is the longest int32 chunk."""
    k = cpu_gemm.max_exact_k() + 1
    a, b = torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), -128, dtype=torch.int8)
    assert cpu_gemm.int_matmul(a, b, which).item() == 2**31
    assert cpu_gemm.int_matmul(a[:, :-1], b[:, :-1], which).item() == INT32_MAX - 16383


@pytest.mark.parametrize("which", BACKENDS)
def test_grouped_accumulators_past_int32(which):
    k, group = 2 * K_127 + 10, K_127 + 3  # two long groups (each overflows int32) and a short one
    a, b = torch.full((1, k), 127, dtype=torch.int8), torch.full((2, k), -127, dtype=torch.int8)
    got = list(cpu_gemm.group_accumulators(a, b, group, which))
    assert [p.dtype for p in got] == [torch.int64, torch.int64, torch.int32]  # int64 where int32 could overflow
    for part, s in zip(got, range(0, k, group)):
        torch.testing.assert_close(part.long(), cpu_gemm.int_matmul_ref(a[:, s:s + group], b[:, s:s + group]),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("which", BACKENDS)
def test_ops_past_int32(which, cpu_backend):
    """int8_linear at K = 133,145 (w8a8 at +-127) and int4_linear per channel at K = 2**31 / (127 * 7) + 1 (w4a8)."""
    cpu_backend(which)
    k8 = K_127 + 1
    xq, wq = torch.full((1, k8), 127, dtype=torch.int8), torch.full((2, k8), 127, dtype=torch.int8)
    out = ops.int8_linear(xq, torch.ones(1, 1), wq, torch.ones(2), None, torch.float64)
    assert out.min().item() > 0  # int32 wrap-around used to flip it negative
    torch.testing.assert_close(out, ops.int8_linear_ref(xq, torch.ones(1, 1), wq, torch.ones(2), None, torch.float64),
                               rtol=6e-8, atol=0)  # acc.float(): one fp32 rounding of an exact 2**31-sized integer
    k4 = INT32_MAX // (127 * 7) + 1
    xq, wp = torch.full((1, k4), 127, dtype=torch.int8), ops.pack_int4(torch.full((1, k4), 7, dtype=torch.int8))
    out = ops.int4_linear(xq, torch.ones(1, 1), wp, torch.ones(1, 1), None, -1, torch.float64)
    assert out.item() == pytest.approx(k4 * 127 * 7, rel=6e-8)
