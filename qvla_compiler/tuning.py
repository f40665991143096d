"""Action-aware weight-scale tuning (ActQuant's idea), after the weights are rounded (RTN or GPTQ).

The integers stay as calibration chose them. Every weight scale of every integer linear (one per group of 2-4-bit
weights, one per output channel at 8 bits) becomes a free parameter: Adam on log-scales, warmed up then cosine-decayed,
fits the planned program's outputs — a policy's whole action chunk — to the float program's; each step takes
TUNE_BATCH of the calibration observations with fresh diffusion noise (so a small buffer is not memorised noise for
noise). Activations stay float while tuning, and an fp32 copy of every integer weight is held meanwhile. The tuned
scales are written into the plan, so every program applied from it replays them; only the scales change, never the
integer format, the ops or the schedule.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qvla_compiler.kernels.ops import LOWERINGS
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.insert_observers import remove_observers
from qvla_compiler.plan import WEIGHT_Q, WEIGHT_SCALE, QuantPlan
from qvla_compiler.program import Program
from qvla_compiler.quant.quantizers import dequantize_unpacked

TUNE_LR = 3e-3  # peak rate on the log-scales (RESULTS §18)
TUNE_WARMUP = 0.25  # share of the steps spent ramping the rate up
TUNE_BATCH = 16  # observations a step (a policy's): drawn from every calibration observation, so more data helps


class TunedScales:
    """Each integer weight of a planned program as integers × sign × exp(log-scale), the log-scales trainable (a
    scale keeps its sign: quantizers._scales may store it negative); the planned graphs read the dequantized weights
    from attributes `qvla_tuned_<k>` that `refresh()` recomputes."""

    def __init__(self, program: Program, plan: QuantPlan):
        self.log_scales: dict[str, torch.nn.Parameter] = {}
        self._ints: dict[str, torch.Tensor] = {}
        self._signs: dict[str, torch.Tensor] = {}
        self._group_sizes: dict[str, int] = {}
        self._sites: dict[str, list[tuple[fx.GraphModule, str, torch.dtype]]] = {}
        for gm in program.graphs.values():
            for node in g.linear_nodes(gm):
                if node.meta["qvla"].is_quantized:
                    self._read_from_attribute(gm, node, plan)
            gm.recompile()
        self.refresh()

    def _read_from_attribute(self, gm: fx.GraphModule, node: fx.Node, plan: QuantPlan) -> None:
        path = node.meta["qvla"].module_path
        if path not in self.log_scales:
            entry = plan.modules[path]
            bits = entry.spec.w_bits
            self._ints[path] = LOWERINGS[bits].unpack(entry.tensors[WEIGHT_Q], entry.in_features).float()
            self._group_sizes[path] = entry.spec.group_size
            scale = entry.tensors[WEIGHT_SCALE].float()
            self._signs[path] = torch.where(scale < 0, -1.0, 1.0)
            self.log_scales[path] = torch.nn.Parameter(scale.abs().clamp_min(torch.finfo(torch.float32).tiny).log())
            self._sites[path] = []
        name = f"qvla_tuned_{sum(map(len, self._sites.values()))}"
        gm.register_buffer(name, torch.empty(0))
        with gm.graph.inserting_before(node):
            node.replace_input_with(node.args[1], gm.graph.get_attr(name))
        self._sites[path].append((gm, name, node.meta["val"].dtype))

    def refresh(self) -> None:
        """Dequantize every weight from the current log-scales (a backward pass frees the last ones' graph)."""
        for path, sites in self._sites.items():
            w = dequantize_unpacked(self._ints[path], self._scale(path), self._group_sizes[path])
            for gm, name, dtype in sites:
                setattr(gm, name, w.to(dtype))

    def _scale(self, path: str) -> torch.Tensor:
        return self._signs[path] * self.log_scales[path].exp()

    def write_into(self, plan: QuantPlan) -> None:
        for path in self.log_scales:
            stored = plan.modules[path].tensors[WEIGHT_SCALE]
            plan.modules[path].tensors[WEIGHT_SCALE] = self._scale(path).detach().to(stored.dtype).contiguous()


def tune_weight_scales(teacher: Program, student: Program, plan: QuantPlan, batches: list, steps: int, *,
                       seed: int = 0x5CA1E, progress: bool = True) -> list[float]:
    """Tune the plan's weight scales in place; returns the relative squared output error of each step (before its
    update). `student`: a fork planned from `plan` (decisions, tensors and rotations in place, not lowered; its
    observers are removed here); `teacher`: the float program."""
    for gm in student.graphs.values():
        remove_observers(gm)
    pool = _stacked(batches) if student.is_policy else None  # a policy's observations, each step's batch drawn from it
    tuned = TunedScales(student, plan)
    opt = torch.optim.Adam(tuned.log_scales.values(), lr=TUNE_LR)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warm_cosine, steps=steps))
    # a seed of its own: the API draws the calibration noise from the user's seed (0 by default), and re-drawing that
    # noise would make the first step in-sample for the rounding (GPTQ's error there is 0.8x its error on fresh noise)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with tqdm(range(steps), desc="tuning scales", unit="step", disable=not progress, leave=False) as bar:
        for _ in bar:
            opt.zero_grad()
            total = 0.0
            step_batches = batches if pool is None else [_draw(pool, gen)]
            for inputs in step_batches:
                ref = teacher.run(inputs)
                tuned.refresh()
                loss = _relative_error(student.run(inputs, grad=True), ref) / len(step_batches)
                loss.backward()
                total += loss.item()
            opt.step()
            decay.step()
            losses.append(total)
            bar.set_postfix(rel_err=f"{total ** 0.5:.4f}")
    tuned.write_into(plan)
    return losses


def _warm_cosine(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 0: Adam's first steps move every scale by the full rate whatever its
    gradient, which undoes GPTQ's joint choice of integers and scales faster than later steps can recover it."""
    warm = max(1, round(TUNE_WARMUP * steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _stacked(batches: list) -> tuple:
    obs = {key: torch.cat([o[key] for o, _ in batches]) for key in batches[0][0]}
    return obs, torch.cat([noise for _, noise in batches])


def _draw(pool: tuple, gen: torch.Generator) -> tuple:
    """TUNE_BATCH observations of the pool (all of them if it has no more), with fresh noise."""
    obs, noise = pool
    pick = torch.randperm(noise.shape[0], generator=gen)[:TUNE_BATCH].sort().values
    fresh = torch.randn((len(pick), *noise.shape[1:]), generator=gen, dtype=noise.dtype).to(noise.device)
    return {key: value[pick.to(value.device)] for key, value in obs.items()}, fresh


def _relative_error(out, ref) -> torch.Tensor:
    outs, refs = torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)
    pairs = [(o.float(), r.float()) for o, r in zip(outs, refs) if r.is_floating_point()]
    return sum((o - r).pow(2).sum() for o, r in pairs) / sum(r.pow(2).sum() for _, r in pairs).clamp_min(1e-12)
