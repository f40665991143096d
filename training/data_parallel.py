"""Data parallelism over CPU processes, for training one tabletop policy on both cores.

One process per core, one thread each, gradients averaged with a gloo all-reduce after every backward pass.  Two
threads inside one process are slower than one for these small matrices (benchmarks/RESULTS.md section 5b), while
two single-threaded processes each run at full speed, so this is how one model gets the second core.

Every rank starts from the same weights (built from the same seed, then broadcast from rank 0 to be sure), gets the
same averaged gradient and takes the same optimizer step, so the replicas stay identical without further
communication.  The sum of two ranks' gradients is the same whichever order it is added in, so a run is as
deterministic as a single-process one.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(args, rank, world)
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable, world: int, args) -> None:
    """Call ``fn(args, rank, world)``: in this process when ``world`` is 1, else in ``world`` spawned processes
    joined by a gloo process group on a free localhost port (an exception in any of them is raised here)."""
    if world == 1:
        fn(args, 0, 1)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True)


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Make every rank's parameters rank 0's (a no-op without a process group)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: Sequence[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
    """Average the parameters' gradients over the ranks in one all-reduce, and the given scalars (the logged losses)
    with them; returns the averaged scalars.  Without a process group nothing is communicated."""
    if not dist.is_initialized():
        return list(scalars)
    world = dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(list(scalars), dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g)
        offset += n
    return flat[offset:].tolist()


def sum_over_workers(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over the ranks (the values themselves without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
