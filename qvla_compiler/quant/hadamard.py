"""Orthonormal Hadamard transforms of width n = m·2^k (QuaRot/SpinQuant online and fused rotations, quantvla.md §10).

H_n = (H_m ⊗ H_{2^k}) / √n, H_{2^k} the Sylvester matrix (applied by an O(n log n) butterfly), H_m a ±1 matrix of
order m = 4·o, o odd, built here by one of three documented constructions:

* Paley I, m = q + 1 with q ≡ 3 (mod 4) a prime power: H = I + [[0, 1ᵀ], [−1, Q]], Q[a, b] = χ(a − b) the Jacobsthal
  matrix of GF(q) (χ = quadratic character). Gives 12, 20, 28 (GF(27)), 44, 60, 68, 84, 108, 132, 140, ...
* Paley II, m = 2(q + 1) with q ≡ 1 (mod 4) a prime power: C = [[0, 1ᵀ], [1, Q]],
  H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]. Gives 36 (q = 17), 52 (GF(25)), 76, 100 (GF(49)), 124, ...
* Goethals–Seidel array of four circulant ±1 matrices A, B, C, D of order o with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4o·I, for
  156 (o = 39) and 172 (o = 43), where neither Paley construction applies. The first rows were found by our own search
  (sequences constant on the orbits of a small multiplier subgroup ⟨g⟩ ≤ Z_o^*, matched by power spectral density,
  the method of Baumert–Hall/Đoković); `tests/test_hadamard.py` re-runs that search and checks the rows below.

Widths 40 = 20·2, 56 = 28·2, ... are Kronecker (Sylvester) doublings of these, so the factorisation is unique:
m = 4·(odd part of n) when n is not a power of two. Base orders are capped at 256 so the dense m×m step stays small.

Convention: `fast_hadamard(x)` computes y = H x for every vector x along `dim`, i.e. y = x @ hadamard_matrix(n).T for
row vectors; the inverse is y @ hadamard_matrix(n). Rotating a linear's input: x' = x Hᵀ, W' = W Hᵀ ⇒ x'W'ᵀ = xWᵀ.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from qvla_compiler.errors import UnsupportedWidthError

_MAX_BASE_ORDER = 256
_RADIX = 16  # largest Sylvester factor applied per butterfly stage

# Goethals–Seidel first rows (circulant A[i, j] = a[(j − i) mod o]); '+' = +1, '-' = −1. Found with multiplier g.
_GS_ROWS = {
    39: (5, (
        "++++++++++++---+++-++-+-++----+-++-++--",
        "++++++-++-++---+++-++-+-++------+--++--",
        "+-+++-----++-+-++---+-+++-+-++--+---++-",
        "+-+---+--++++---+-+--+-+---++++--+---+-",
    )),
    43: (4, (
        "++++++--+--++---+--++++----+----++-+-+-+-++",
        "+++-+--++--+----+-+--++---+++++-+-++---+-++",
        "+++-+--++--+----+-+--++---+++++-+-++---+-++",
        "++--+--+---+----+-+--+----+-+++---++-----+-",
    )),
}


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _construction(m: int) -> str | None:
    if m < 4 or m % 8 != 4 or m > _MAX_BASE_ORDER:
        return None
    if _prime_power(m - 1):
        return "paley1"
    if _prime_power(m // 2 - 1):
        return "paley2"
    if m // 4 in _GS_ROWS:
        return "goethals-seidel"
    return None


def _gf_difference_character(q: int) -> np.ndarray:
    """χ(a − b) for all a, b in GF(q); elements are base-p digit vectors (polynomials modulo an irreducible f)."""
    p, k = _prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(k)) % p  # [q, k]
    weights = p ** np.arange(k)
    for tail in itertools.product(range(p), repeat=k):  # f(x) = x^k + Σ tail_i x^i
        if tail[0] == 0 and k > 1:
            continue
        prod = np.zeros((q, q, 2 * k - 1), dtype=np.int64)
        for i, j in itertools.product(range(k), range(k)):
            prod[:, :, i + j] += np.outer(digits[:, i], digits[:, j])
        for deg in range(2 * k - 2, k - 1, -1):  # x^deg = −x^(deg−k)·Σ tail_i x^i
            top = prod[:, :, deg].copy()
            prod[:, :, deg] = 0
            prod[:, :, deg - k:deg] -= top[:, :, None] * np.array(tail)
        mul = (prod[:, :, :k] % p) @ weights
        if k == 1 or (mul[1:, 1:] != 0).all():  # no zero divisors ⇔ f irreducible ⇔ a field
            break
    is_square = np.zeros(q, dtype=bool)
    is_square[np.diag(mul)[1:]] = True
    chi = np.where(is_square, 1, -1)
    chi[0] = 0
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    return chi[diff]


def _paley1(m: int) -> np.ndarray:
    core = np.zeros((m, m), dtype=np.int64)
    core[0, 1:], core[1:, 0] = 1, -1
    core[1:, 1:] = _gf_difference_character(m - 1)
    return np.eye(m, dtype=np.int64) + core


def _paley2(m: int) -> np.ndarray:
    q = m // 2 - 1
    conf = np.zeros((q + 1, q + 1), dtype=np.int64)
    conf[0, 1:], conf[1:, 0] = 1, 1
    conf[1:, 1:] = _gf_difference_character(q)
    return np.kron(conf, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


def _goethals_seidel(m: int) -> np.ndarray:
    o = m // 4
    a, b, c, d = (
        np.stack([np.roll(np.array([1 if s == "+" else -1 for s in row]), i) for i in range(o)])
        for row in _GS_ROWS[o][1]
    )
    r = np.eye(o, dtype=np.int64)[::-1]
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ])


@functools.lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    build = {"paley1": _paley1, "paley2": _paley2, "goethals-seidel": _goethals_seidel}[_construction(m)]
    return torch.from_numpy(build(m).astype(np.float64))


def _split(n: int) -> tuple[int, int] | None:
    if n < 1:
        return None
    odd = n >> ((n & -n).bit_length() - 1)
    if odd == 1:
        return 1, n
    m = 4 * odd
    return (m, n // m) if n % m == 0 and _construction(m) else None


def supported_width(n: int) -> bool:
    """True when a Hadamard matrix of order n can be built here (n = 2^k or n = m·2^k with a known base order m)."""
    return _split(int(n)) is not None


def _nearest_supported(n: int) -> tuple[int | None, int]:
    below = next((w for w in range(n - 1, 0, -1) if supported_width(w)), None)
    above = next(w for w in itertools.count(max(n + 1, 1)) if supported_width(w))
    return below, above


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k; m = 1 for powers of two. Raises UnsupportedWidthError otherwise."""
    split = _split(int(n))
    if split is None:
        below, above = _nearest_supported(int(n))
        raise UnsupportedWidthError(
            f"No Hadamard matrix of order {n} is known here: n must be 2^k or m·2^k with m = 4·odd(n) ≤ "
            f"{_MAX_BASE_ORDER} built by Paley I/II or Goethals–Seidel (e.g. 12, 20, 28, 36, 40, 52, 60, 108, 140, "
            f"156, 172). Nearest supported widths: {below} and {above}. Pad the channel dimension to one of them, "
            f"rotate per head / per block of a supported width, or skip the rotation for this layer."
        )
    return split


def hadamard_base(m: int) -> torch.Tensor:
    """The unnormalized ±1 matrix H_m (float64) used for the non-power-of-two factor; H_m H_mᵀ = m·I."""
    if m != 1 and _construction(m) is None:
        hadamard_factors(m)  # raises with a helpful message
        raise UnsupportedWidthError(f"{m} is not a base order; use hadamard_factors({m}) to split it.")
    return _base(m).clone()


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_small_sylvester = functools.lru_cache(maxsize=8)(_sylvester)  # only r ≤ _RADIX goes through the cache


def hadamard_butterfly(x: torch.Tensor, had_m: torch.Tensor | None, inner: int = 1) -> torch.Tensor:
    """Unnormalized (H_m ⊗ H_{2^k} ⊗ I_inner) applied to the last dim of x (size m·2^k·inner).

    The 2^k part is a radix-16 butterfly: H_{2^k} = H_r1 ⊗ H_r2 ⊗ …, r_i ≤ 16, each factor one GEMM over its axis
    (n·Σr_i ≈ 4·n·k adds, O(n log n); on CPU ~4x faster than radix-2 stages). The m part is one small matmul.
    """
    m = 1 if had_m is None else had_m.shape[0]
    lead, width = x.shape[:-1], x.shape[-1]
    stop = width // m
    y = x.reshape(-1, stop)
    h = inner
    while h < stop:  # mix indices i, i + h, …, i + (r−1)·h inside every run of r·h
        r = min(_RADIX, stop // h)
        h_r = _small_sylvester(r).to(y.dtype)
        y = y.reshape(-1, r) @ h_r if h == 1 else torch.matmul(h_r, y.reshape(-1, r, h))  # H_r symmetric
        y = y.reshape(-1, stop)
        h *= r
    y = y.reshape(-1, m, stop)
    if m > 1:
        y = torch.matmul(had_m.to(y.dtype), y)
    return y.reshape(*lead, width)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal H_n = (H_m ⊗ H_{2^k}) / √n, so H Hᵀ = I.

    Example::

        >>> H = hadamard_matrix(48)            # H_12 ⊗ H_4 (GR00T DiT head_dim)
        >>> torch.allclose(H @ H.T, torch.eye(48, dtype=torch.float64))
        True
    """
    m, p = hadamard_factors(n)
    return (torch.kron(_base(m), _sylvester(p)) / math.sqrt(n)).to(dtype)


def fast_hadamard(x: torch.Tensor, dim: int = -1, inverse: bool = False) -> torch.Tensor:
    """y = H_n x along `dim` (H_n orthonormal, = hadamard_matrix(n)); `inverse=True` applies H_nᵀ.

    O(n log n + n·m) per vector. Example::

        >>> x = torch.randn(2, 1536, dtype=torch.float64)      # 1536 = 12·128
        >>> torch.allclose(fast_hadamard(x), x @ hadamard_matrix(1536).T)
        True
    """
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    m, _ = hadamard_factors(n)
    had = _base(m) if m > 1 else None
    if had is not None and inverse:
        had = had.T
    y = hadamard_butterfly(x, had) * (1.0 / math.sqrt(n))
    return y.movedim(-1, dim)
