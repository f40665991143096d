import math

import pytest

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.stats import mcnemar_exact, paired_summary, summarize, wilson_interval


def test_wilson_hand_computed():
    # p = 0.8, n = 10, z = 1.96: centre 0.99208/1.38416, half 1.96*sqrt(0.025604)/1.38416
    lo, hi = wilson_interval(8, 10)
    centre = (0.8 + 1.96 ** 2 / 20) / (1 + 1.96 ** 2 / 10)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 10 + 1.96 ** 2 / 400) / (1 + 1.96 ** 2 / 10)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and 0 < hi0 < 0.2
    with pytest.raises(QvlaError):
        wilson_interval(5, 3)


def test_mcnemar_hand_computed():
    # b = 1 (A only), c = 6 (B only), 3 concordant: p = 2 * (1 + 7) / 2**7 = 0.125
    a = [True] + [False] * 6 + [True, True, False]
    b = [False] + [True] * 6 + [True, True, False]
    assert mcnemar_exact(a, b) == pytest.approx(0.125)
    assert mcnemar_exact(b, a) == pytest.approx(0.125)
    assert mcnemar_exact([True, False], [True, False]) == 1.0
    assert mcnemar_exact([True] * 10, [False] * 10) == pytest.approx(2 / 2 ** 10)
    with pytest.raises(QvlaError):
        mcnemar_exact([True], [True, False])


def test_summarize_and_paired():
    res_a = [{"family": "reach", "seed": i, "success": i < 8} for i in range(10)] + \
            [{"family": "push", "seed": i, "success": i < 2} for i in range(5)]
    res_b = [{"family": "reach", "seed": i, "success": i < 3} for i in range(10)] + \
            [{"family": "push", "seed": i, "success": i < 2} for i in range(5)]
    s = summarize(res_a)
    assert s["reach"]["rate"] == 0.8 and s["reach"]["ci_low"] == pytest.approx(0.4902, abs=1e-4)
    assert s["overall"]["n"] == 15 and s["overall"]["successes"] == 10
    p = paired_summary(res_a, res_b)
    assert p["reach"]["a_only"] == 5 and p["reach"]["b_only"] == 0
    assert p["reach"]["p_mcnemar"] == pytest.approx(2 / 32)
    assert p["push"]["p_mcnemar"] == 1.0
    with pytest.raises(QvlaError):
        paired_summary(res_a, res_b[:-1])
