"""Programs: the captured graphs of a policy (or plain module) and how to run them end to end.

A policy program is a prefix graph and a denoise-step graph driven by the shared Euler loop; a module program is
one forward graph. The same object runs the float graphs, the observed graphs during calibration and the
lowered integer graphs, so every comparison (SQNR, action fidelity) uses identical inputs and noise.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from qvla_compiler.errors import CalibrationError
from qvla_compiler.export import OBS_KEYS, example_outputs, leading_batch
from qvla_compiler.kernels.bf16_gemms import fp32_products
from qvla_compiler.kernels.cpu_gemm import uncached_weights
from qvla_compiler.models.sampling import FlowSchedule, euler_sample
from qvla_compiler.passes.fold_computed_weights import FOLDED_FROM


@dataclasses.dataclass
class Program:
    graphs: dict[str, fx.GraphModule]
    schedule: FlowSchedule | None = None  # None: a plain module with a single "forward" graph

    @property
    def is_policy(self) -> bool:
        return self.schedule is not None

    def run(self, inputs: Any, what: str = "program input", *, grad: bool = False) -> torch.Tensor:
        """Policy: inputs = (obs dict, noise) → action chunk. Module: inputs = tuple of args → output. `grad`: with
        autograd on (scale tuning differentiates the planned graphs)."""
        self.check_inputs(inputs, what)  # `what` names the inputs in the error (e.g. "calibration batch 3")
        with torch.set_grad_enabled(grad), fp32_products(*self.graphs.values()):  # bf16 products in fp32 if emulated
            return self.as_module()(*self.flat_args(inputs))

    def flat_args(self, inputs: Any) -> tuple:
        if self.is_policy:
            obs, noise = inputs
            return (*(obs[k] for k in OBS_KEYS), noise)
        return tuple(inputs)

    def check_inputs(self, inputs: Any, what: str) -> None:
        """Refuse inputs the captured graphs cannot take — a missing key, a wrong dtype, rank or trailing shape —
        with a CalibrationError that names the tensor, instead of a torch error deep inside the graph."""
        if self.is_policy:
            obs, noise = inputs
            if not isinstance(obs, dict) or set(obs) != set(OBS_KEYS):
                got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
                raise CalibrationError(f"{what}: an observation must be a dict with keys {list(OBS_KEYS)}, got {got}; "
                                       "build batches like policy.calibration_batches(n)")
        leaves = torch.utils._pytree.tree_leaves(self.flat_args(inputs))
        graph = self.graphs["prefix" if self.is_policy else "forward"]
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        wants = [n.meta.get("val") for n in graph.graph.nodes if n.op == "placeholder"]
        if len(leaves) - self.is_policy != len(wants):  # a policy's noise feeds the denoise graph, not the prefix
            raise CalibrationError(f"{what}: {len(leaves)} input tensors, but the captured program takes "
                                   f"{len(wants)} ({', '.join(names)}); pass batches shaped like the example inputs")
        for name, got, want in zip(names, leaves, wants):
            _check_like(name, got, want, what)

    def fork(self) -> "Program":
        """A copy whose graphs can be rewritten independently; tensors are shared, not copied (passes never change a
        tensor in place: a rewritten weight is a new buffer), so a fork costs graph structure only."""
        forks = {}
        for name, gm in self.graphs.items():
            folded_from = (t for n in gm.graph.nodes for t in n.meta.get(FOLDED_FROM, ()))  # shared, as the weights
            memo = {id(t): t for t in (*gm.parameters(), *gm.buffers(), *folded_from)}
            with warnings.catch_warnings():  # torch's pytree specs in the graph's meta warn when copied (LeafSpec)
                warnings.simplefilter("ignore", FutureWarning)
                forks[name] = copy.deepcopy(gm, memo)
        return Program(forks, self.schedule)

    def as_module(self) -> nn.Module:
        if self.is_policy:
            return PolicyProgram(self.graphs["prefix"], self.graphs["denoise"], self.schedule)
        return self.graphs["forward"]

    def export(self, example_args: tuple) -> dict[str, torch.export.ExportedProgram]:
        """The graphs as torch.export programs, what a saved program stores. Each is exported from its (lowered) flat
        graph, so the float model is not traced again and the Euler loop is not unrolled: a policy gives
        {"prefix", "denoise"} with the batch dynamic (1..1024), run by PolicyProgram; a module gives {"model"}, its
        batch dynamic if it was captured so. `example_args`: the flat inputs, (images, tokens, token_mask, state,
        noise) for a policy."""
        with torch.no_grad():
            if not self.is_policy:  # a module captured with a symbolic batch keeps it
                gm, args = self.graphs["forward"], tuple(example_args)
                shapes = leading_batch(args) if _symbolic_batch(gm) else None
                return {"model": torch.export.export(gm, args, strict=False, dynamic_shapes=shapes)}
            *obs, noise = example_args
            prefix = example_outputs(self.graphs["prefix"], tuple(obs), functools.partial(self._run_prefix, obs))
            t = torch.full((noise.shape[0],), self.schedule.timesteps[0], dtype=noise.dtype, device=noise.device)
            batch = Dim("batch", min=1, max=1024)
            shapes = (tuple({0: batch} for _ in prefix), {0: batch}, {0: batch})  # what euler_sample feeds
            return {"prefix": torch.export.export(self.graphs["prefix"], tuple(obs), strict=False,
                                                  dynamic_shapes=tuple({0: batch} for _ in obs)),
                    "denoise": torch.export.export(self.graphs["denoise"], (prefix, noise, t), strict=False,
                                                   dynamic_shapes=shapes)}

    def _run_prefix(self, obs) -> tuple:
        # uncached: the CPU weight cache would keep an fp32 copy of the backbone's integer weights (RESULTS §14b)
        with torch.no_grad(), uncached_weights(), fp32_products(self.graphs["prefix"]):
            return tuple(self.graphs["prefix"](*obs))


def _symbolic_batch(gm: fx.GraphModule) -> bool:
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    return any(isinstance(v, torch.Tensor) and v.dim() and not isinstance(v.shape[0], int) for v in vals)


class PolicyProgram(nn.Module):
    """The whole sampler as one module: forward(images, tokens, token_mask, state, noise) -> actions. The prefix and
    denoise modules are the program's graphs, or the same graphs read back from a saved program."""

    def __init__(self, prefix: nn.Module, denoise: nn.Module, schedule: FlowSchedule):
        super().__init__()
        self.prefix, self.denoise, self.schedule = prefix, denoise, schedule

    def forward(self, images, tokens, token_mask, state, noise):
        obs = dict(images=images, tokens=tokens, token_mask=token_mask, state=state)
        return euler_sample(lambda **o: self.prefix(*(o[k] for k in OBS_KEYS)),
                            lambda prefix, x, t: self.denoise(tuple(prefix), x, t), obs, noise, self.schedule)


def _check_like(name: str, got: Any, want: Any, what: str) -> None:
    if want is None:
        return
    if not isinstance(got, torch.Tensor):
        raise CalibrationError(f"{what}: input {name!r} must be a tensor, got {type(got).__name__}")
    static = [d if isinstance(d, int) else None for d in want.shape]  # symbolic dims (the batch) accept any size
    if got.dtype != want.dtype or got.dim() != len(static) or any(
            s is not None and g != s for g, s in zip(got.shape[1:], static[1:])):
        expected = "x".join("B" if s is None else str(s) for s in static)
        raise CalibrationError(f"{what}: input {name!r} is {got.dtype} [{'x'.join(map(str, got.shape))}] but the "
                               f"captured program takes {want.dtype} [{expected}]; convert or reshape the batch to "
                               "match the example inputs")


def with_noise(batches: Iterable[dict], noise_shape: tuple[int, ...], seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Pair each observation batch with reproducible diffusion noise of shape [B, *noise_shape]."""
    gen = torch.Generator().manual_seed(seed)
    for obs in batches:
        batch = next(iter(obs.values())).shape[0]
        yield obs, torch.randn((batch, *noise_shape), generator=gen)
