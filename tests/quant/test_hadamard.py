"""Hadamard constructions and transforms: orthogonality, fast == dense, Kronecker factorisation, errors."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla_compiler.errors import UnsupportedWidthError
from qvla_compiler.quant.hadamard import (
    _GS_ROWS,
    _construction,
    fast_hadamard,
    hadamard_base,
    hadamard_factors,
    hadamard_matrix,
    supported_width,
)

LISTED_ORDERS = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]
BASE_ORDERS = [m for m in range(12, 257, 8) if _construction(m)]
EYE = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("m", LISTED_ORDERS)
def test_listed_orders_are_hadamard(m):
    h = hadamard_matrix(m) * math.sqrt(m)
    assert set(h.round().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, m * EYE(m), atol=1e-9, rtol=0)


def test_expected_constructions():
    got = {m: _construction(hadamard_factors(m)[0]) for m in LISTED_ORDERS}
    assert got == {12: "paley1", 20: "paley1", 28: "paley1", 36: "paley2", 40: "paley1", 52: "paley2",
                   60: "paley1", 108: "paley1", 140: "paley1", 156: "goethals-seidel", 172: "goethals-seidel"}
    assert hadamard_factors(40) == (20, 2) and hadamard_factors(6144) == (12, 512) and hadamard_factors(48) == (12, 4)


@pytest.mark.parametrize("m", BASE_ORDERS)
def test_every_base_order_is_exact_integer_hadamard(m):
    h = hadamard_base(m)
    torch.testing.assert_close(h @ h.T, m * EYE(m), atol=0, rtol=0)


@settings(max_examples=30, deadline=None)
@given(m=st.sampled_from([1] + BASE_ORDERS), k=st.integers(0, 3), batch=st.integers(1, 3))
def test_property_orthogonal_and_fast_equals_dense(m, k, batch):
    n = m * 2**k if m * 2**k <= 1024 else m  # keep the dense float64 checks cheap
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, EYE(n), atol=1e-10, rtol=0)
    x = torch.randn(batch, n, dtype=torch.float64)
    y = fast_hadamard(x)
    torch.testing.assert_close(y, x @ h.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast_hadamard(y, inverse=True), x, atol=1e-10, rtol=0)
    w = torch.randn(3, n, dtype=torch.float64)  # x' = x Hᵀ, W' = W Hᵀ  ⇒  x'W'ᵀ = xWᵀ
    torch.testing.assert_close(y @ fast_hadamard(w).T, x @ w.T, rtol=1e-9, atol=1e-9)


def test_fast_matches_two_sided_kron_on_large_widths():
    for n, m in [(6144, 12), (11008, 172), (4096, 1)]:  # (H_m ⊗ H_p) x = vec(H_m X H_pᵀ), X = x viewed [m, p]
        x = torch.randn(2, n, dtype=torch.float64)
        p = n // m
        hm = hadamard_matrix(m) if m > 1 else EYE(1)
        expected = (hm @ x.reshape(2, m, p) @ hadamard_matrix(p).T).reshape(2, n)
        torch.testing.assert_close(fast_hadamard(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [48, 96, 384, 1536])
def test_fast_matches_dense_on_vla_widths(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(fast_hadamard(x), x @ hadamard_matrix(n).T, atol=1e-10, rtol=0)
    xt = x.transpose(-1, -2).contiguous()
    torch.testing.assert_close(fast_hadamard(xt, dim=-2), fast_hadamard(x).transpose(-1, -2), atol=1e-12, rtol=0)


def test_float32_and_bfloat16_inputs():
    x = torch.randn(4, 1536)
    torch.testing.assert_close(fast_hadamard(x), x @ hadamard_matrix(1536, torch.float32).T, atol=1e-4, rtol=1e-4)
    assert fast_hadamard(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("n", [3, 6, 10, 24 * 23, 92, 116, 4 * 65, 0, -4])
def test_unsupported_width_error(n):
    assert not supported_width(n)
    with pytest.raises(UnsupportedWidthError, match="Nearest supported widths"):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError):  # UnsupportedWidthError is also a ValueError
            fast_hadamard(torch.zeros(2, n))


def test_error_names_neighbours():
    with pytest.raises(UnsupportedWidthError, match="88 and 96"):
        hadamard_factors(92)


def _search_circulant_quadruple(o, g):
    """Re-derive a Goethals–Seidel quadruple: ±1 sequences constant on the orbits of ⟨g⟩ ≤ Z_o^*, paired so that
    their power spectral densities sum to 4o at every frequency."""
    group, frontier = {1}, [1]
    while frontier:
        nxt = frontier.pop() * g % o
        if nxt not in group:
            group.add(nxt)
            frontier.append(nxt)
    orbits = []
    for i in range(o):
        if not any(i in orb for orb in orbits):
            orbits.append(sorted({i * h % o for h in group}))
    signs = np.array([(1,) + p for p in itertools.product([1, -1], repeat=len(orbits) - 1)])
    member = np.zeros((len(orbits), o))
    for i, orb in enumerate(orbits):
        member[i, orb] = 1
    seqs = signs @ member
    psd = (np.abs(np.fft.fft(seqs, axis=1)) ** 2)[:, [orb[0] for orb in orbits]]
    keep = (psd <= 4 * o + 1e-6).all(1)
    seqs, psd = seqs[keep], psd[keep]
    pairs = {}
    for i in range(len(seqs)):
        for j, row in enumerate(np.round(psd[i] + psd[i:], 3), start=i):
            pairs.setdefault(row.tobytes(), (i, j))
    for key, (i, j) in pairs.items():
        other = pairs.get(np.round(4 * o - np.frombuffer(key), 3).tobytes())
        if other:
            return ["".join("+" if v > 0 else "-" for v in seqs[t]) for t in (i, j, *other)]
    return None


@pytest.mark.parametrize("o", sorted(_GS_ROWS))
def test_goethals_seidel_rows_come_from_the_search(o):
    g, rows = _GS_ROWS[o]
    assert tuple(_search_circulant_quadruple(o, g)) == rows
