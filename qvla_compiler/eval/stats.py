"""Success-rate statistics: Wilson intervals and the exact McNemar test on paired episodes."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from qvla_compiler.errors import QvlaError

__all__ = ["wilson_interval", "mcnemar_exact", "summarize", "paired_summary"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise QvlaError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _discordant(a_success: Sequence[bool], b_success: Sequence[bool]) -> tuple[int, int]:
    if len(a_success) != len(b_success):
        raise QvlaError(f"paired outcomes need equal lengths, got {len(a_success)} and {len(b_success)}; "
                        "evaluate both policies on the same (family, seed) episodes")
    b = sum(1 for x, y in zip(a_success, b_success) if x and not y)
    c = sum(1 for x, y in zip(a_success, b_success) if y and not x)
    return b, c


def mcnemar_exact(a_success: Sequence[bool], b_success: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: binomial(b, b + c, 0.5) on the discordant pairs.

    ``b`` counts episodes where A succeeded and B failed, ``c`` the reverse;
    returns 1.0 when there are no discordant pairs.
    """
    b, c = _discordant(a_success, b_success)
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest  # lazy: scipy.stats is slow to import

    return float(min(1.0, binomtest(b, b + c, 0.5, alternative="two-sided").pvalue))


def _get(r, key):
    return r[key] if isinstance(r, dict) else getattr(r, key)


def summarize(results: Iterable, z: float = 1.96) -> dict:
    """Success rate per family and overall, with Wilson intervals.

    ``results``: EpisodeResult objects or dicts with ``family`` and ``success``.
    Returns ``{family: {"n", "successes", "rate", "ci_low", "ci_high"}, ..., "overall": {...}}``.
    """
    counts: dict[str, list[int]] = {}
    for r in results:
        fam = _get(r, "family")
        c = counts.setdefault(fam, [0, 0])
        c[0] += bool(_get(r, "success"))
        c[1] += 1

    def entry(s: int, n: int) -> dict:
        lo, hi = wilson_interval(s, n, z)
        return {"n": n, "successes": s, "rate": s / n if n else float("nan"), "ci_low": lo, "ci_high": hi}

    out = {fam: entry(*counts[fam]) for fam in sorted(counts)}
    out["overall"] = entry(sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
    return out


def paired_summary(results_a: Iterable, results_b: Iterable, z: float = 1.96) -> dict:
    """Compare two policies evaluated on the same episodes (paired by (family, seed)).

    Returns per family and overall: rate_a, rate_b, their intervals, the
    discordant counts (a_only, b_only) and the exact McNemar p-value.
    """
    a = {(_get(r, "family"), _get(r, "seed")): bool(_get(r, "success")) for r in results_a}
    b = {(_get(r, "family"), _get(r, "seed")): bool(_get(r, "success")) for r in results_b}
    if set(a) != set(b):
        raise QvlaError(f"the two result sets cover different episodes ({len(set(a) ^ set(b))} unpaired); "
                        "run both policies on the same families and seeds")
    keys = sorted(a)

    def entry(ks) -> dict:
        xa, xb = [a[k] for k in ks], [b[k] for k in ks]
        n, sa, sb = len(ks), sum(xa), sum(xb)
        a_only, b_only = _discordant(xa, xb)
        return {"n": n, "rate_a": sa / n if n else float("nan"), "rate_b": sb / n if n else float("nan"),
                "ci_a": wilson_interval(sa, n, z), "ci_b": wilson_interval(sb, n, z),
                "a_only": a_only, "b_only": b_only, "p_mcnemar": mcnemar_exact(xa, xb)}

    fams = sorted({k[0] for k in keys})
    out = {f: entry([k for k in keys if k[0] == f]) for f in fams}
    out["overall"] = entry(keys)
    return out
