"""Both CPU integer GEMM backends give the exact int32 accumulator, including at the edge of fp32 exactness."""
import pytest
import torch

from qvla_compiler.kernels import cpu_gemm

BACKENDS = ["int_mm", "fp32_exact"]


def _exact(a, b_t):
    return (a.long() @ b_t.long().t()).to(torch.int32)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (17, 1024, 9), (3, 1025, 4), (50, 3000, 33)])
def test_int_matmul_is_exact(which, m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(cpu_gemm.int_matmul(a, b, which), _exact(a, b))


@pytest.mark.parametrize("which", BACKENDS)
def test_worst_case_magnitudes(which):
    """All -128: every 1024-chunk sums to exactly 2**24, the last integer fp32 holds with its neighbours."""
    a = torch.full((2, 2048 + 7), -128, dtype=torch.int8)
    b = torch.full((3, 2048 + 7), -128, dtype=torch.int8)
    assert torch.equal(cpu_gemm.int_matmul(a, b, which), _exact(a, b))


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("k,group", [(70, 32), (256, 128), (300, 128), (2100, 2048)])
def test_grouped_accumulators_are_exact(which, k, group):
    a = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    b = torch.randint(-8, 8, (6, k), dtype=torch.int8)
    got = torch.stack(list(cpu_gemm.group_accumulators(a, b, group, which)))
    want = torch.stack([_exact(a[:, s:s + group], b[:, s:s + group]) for s in range(0, k, group)])
    assert torch.equal(got, want)


def test_backend_override(monkeypatch):
    cpu_gemm.backend.cache_clear()
    monkeypatch.setenv("QVLA_CPU_GEMM", "int_mm")
    assert cpu_gemm.backend() == "int_mm"
    cpu_gemm.backend.cache_clear()
    monkeypatch.setenv("QVLA_CPU_GEMM", "fast")
    with pytest.raises(Exception, match="QVLA_CPU_GEMM"):
        cpu_gemm.backend()
    cpu_gemm.backend.cache_clear()


def test_prepared_weight_is_cached_and_follows_in_place_changes(monkeypatch):
    monkeypatch.setenv("QVLA_CPU_WEIGHT_CACHE", "1")
    a = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    calls = []
    make = lambda: calls.append(1) or w.float()  # noqa: E731
    first = cpu_gemm.weight_operand(w, ("t",), make)
    assert cpu_gemm.weight_operand(w, ("t",), make) is first and len(calls) == 1
    w.add_(1)  # in place: the version counter moves, the operand is rebuilt
    assert torch.equal(cpu_gemm.weight_operand(w, ("t",), make), w.float()) and len(calls) == 2
    assert torch.equal(cpu_gemm.int_matmul_prepared(a, w, "fp32_exact"), _exact(a, w).float())
    assert torch.equal(cpu_gemm.int_matmul_prepared(a, w, "fp32_exact"), _exact(a, w).float())  # cached path
    wid = id(w)
    del w, first
    assert wid not in cpu_gemm._WEIGHT_CACHE  # dies with its weight


def test_weight_cache_off(monkeypatch):
    monkeypatch.setenv("QVLA_CPU_WEIGHT_CACHE", "0")
    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    assert cpu_gemm.weight_operand(w, ("t",), lambda: w.float()) is not cpu_gemm.weight_operand(w, ("t",), lambda: w.float())


def test_uncached_weights_block_caches_nothing_and_gives_the_same_result(monkeypatch):
    monkeypatch.setenv("QVLA_CPU_WEIGHT_CACHE", "1")
    a = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    with cpu_gemm.uncached_weights():
        inside = cpu_gemm.int_matmul_prepared(a, w, "fp32_exact")
        assert id(w) not in cpu_gemm._WEIGHT_CACHE
    assert torch.equal(inside, _exact(a, w).float())
    assert torch.equal(cpu_gemm.int_matmul_prepared(a, w, "fp32_exact"), inside)
    assert id(w) in cpu_gemm._WEIGHT_CACHE  # outside the block the cache is on again


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("k", [1, 1024, 1025, 3000])
def test_prepared_matmul_is_the_exact_accumulator(which, k):
    a = torch.randint(-128, 128, (6, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    got = cpu_gemm.int_matmul_prepared(a, b, which)
    assert got.dtype == torch.float32 and torch.equal(got, _exact(a, b).float())
