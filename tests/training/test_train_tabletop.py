"""Helpers of training/train_tabletop.py: the weight average, the temporary swap, the batch mix with DAgger data and
the per-family episode counts."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "training"))

from train_tabletop import _KEYS, Batches, WeightAverage, averaged, episodes_by_family, main  # noqa: E402


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


def _pool(n: int, tag: float) -> dict:
    # every field of a row carries the row's id (tag + index), so a batch shows where each row came from
    ids = tag + torch.arange(n, dtype=torch.float32)
    return {k: ids.view(n, *([1] * (2 if k == "images" else 1))).expand(n, *([3, 2] if k == "images" else [2]))
            for k in _KEYS}


def test_batches_read_the_demonstrations_in_shuffled_passes_then_mix_in_the_corrections():
    batches = Batches(_pool(10, 0.0), batch=4, gen=torch.Generator().manual_seed(0), mix=0.5)
    seen = torch.cat([batches.next()["state"][:, 0] for _ in range(2)])   # 8 of 10 rows, no repeats in a pass
    assert len(set(seen.tolist())) == 8 and all(0 <= v < 10 for v in seen.tolist())
    batches.add_corrections(_pool(6, 100.0))
    batches.add_corrections(_pool(6, 200.0))                            # rounds accumulate
    assert batches.corrections.n == 12
    for _ in range(5):
        b = batches.next()
        rows = b["state"][:, 0].tolist()
        assert len(rows) == 4 and sum(r >= 100 for r in rows) == 2      # exactly `mix` of every batch
        assert all(torch.all(b[k].flatten(1) == b["state"][:, :1]) for k in _KEYS)  # fields stay row-aligned


def test_family_episodes_override_the_default_count():
    assert episodes_by_family(14000, []) == {"reach": 14000, "push": 14000, "sequence": 14000}
    assert episodes_by_family(14000, ["push=26000"]) == {"reach": 14000, "push": 26000, "sequence": 14000}
    for bad in (["pull=10"], ["push"], ["push=0"], ["push=-3"]):
        with pytest.raises(ValueError, match="FAMILY=N"):
            episodes_by_family(10, bad)


def test_cli_refuses_counts_the_workers_do_not_divide(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "groot", "--out", "x.safetensors", "--workers", "2", "--episodes", "10",
              "--family-episodes", "push=11"])
    assert "divide" in capsys.readouterr().err
