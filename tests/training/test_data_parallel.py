"""training/data_parallel.py: two gloo workers average their gradients, stay identical, and match one process
training on the union of their batches."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "training"))

from data_parallel import average_gradients, broadcast_parameters, run_workers, sum_over_workers  # noqa: E402

STEPS, ROWS = 5, 6


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(STEPS, ROWS, 3, generator=g), torch.randn(STEPS, ROWS, 2, generator=g)


def _train(args, rank: int, world: int) -> None:
    """Each rank: its own data, a model seeded differently per rank (the broadcast must fix that)."""
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    if world == 1:  # the single-process reference trains on both ranks' rows at once, from rank 0's weights
        xs, ys = (torch.cat(t, dim=1) for t in zip(_data(0), _data(1)))
    else:
        xs, ys = _data(rank)
    params = list(model.parameters())
    broadcast_parameters(params)
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses += average_gradients(params, [loss.item()])
        opt.step()
    total = sum_over_workers([rank + 1.0, 10.0])
    torch.save({"params": [p.detach() for p in params], "losses": losses, "total": total}, Path(args.out) / f"rank{rank}-of{world}.pt")


def test_two_workers_stay_identical_and_match_one_process_on_the_whole_batch(tmp_path):
    args = argparse.Namespace(out=str(tmp_path))
    run_workers(_train, 2, args)
    run_workers(_train, 1, args)
    r0, r1, ref = (torch.load(tmp_path / f, weights_only=True) for f in ("rank0-of2.pt", "rank1-of2.pt", "rank0-of1.pt"))
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)       # the replicas never drift apart
    for a, b in zip(r0["params"], ref["params"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # mean of shard gradients = full-batch gradient
    assert r0["losses"] == r1["losses"]                           # the logged loss is the average over ranks
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-5)
    assert r0["total"] == r1["total"] == [3.0, 20.0] and ref["total"] == [1.0, 10.0]
    assert ref["params"][0].abs().sum() > 0 and r0["losses"][0] != r0["losses"][-1]  # it did train


def test_without_a_process_group_gradients_and_scalars_pass_through():
    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert average_gradients(list(model.parameters()), [1.5, 2.0]) == [1.5, 2.0]
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
