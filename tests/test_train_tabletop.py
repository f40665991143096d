"""Helpers of benchmarks/train_tabletop.py that decide what gets saved: the weight average and the temporary swap."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tabletop import WeightAverage, averaged  # noqa: E402


def _toy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_weight_average_follows_the_warmed_up_decay_exactly():
    model = _toy()
    avg = WeightAverage(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(step=0)          # warm-up: d = min(0.9, 1/10) = 0.1, so the shadow moves 90% of the way
    for s, p0 in zip(avg.shadow, start):
        torch.testing.assert_close(s, p0 + 0.9)
    for step in range(1, 200):  # constant weights: the average converges to them
        avg.update(step)
    for s, p in zip(avg.shadow, model.parameters()):
        torch.testing.assert_close(s, p.detach(), atol=1e-6, rtol=0)


def test_averaged_swaps_in_the_average_and_restores_the_live_weights():
    model = _toy()
    avg = WeightAverage(model, decay=0.5)
    live = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for s in avg.shadow:
            s.zero_()
    model.train()
    with averaged(model, avg) as m:
        assert not m.training and all(torch.count_nonzero(p) == 0 for p in m.parameters())
    assert model.training
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), live))
    with averaged(model, None) as m:  # no average: the live weights, in eval mode
        assert all(torch.equal(p, v) for p, v in zip(m.parameters(), live))
