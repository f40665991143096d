"""Run calibration data through an observed program, with a progress bar, and nothing else."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from qvla_compiler.errors import CalibrationError
from qvla_compiler.program import Program


def calibrate(program: Program, batches: Iterable[Any] | Callable[[Callable[[Any], Any]], None], *,
              total: int | None = None, progress: bool = True) -> int:
    """Run every batch (or call `forward_loop(run)` once) through `program`; returns the number of batches.

    `batches` is an iterable of program inputs, or a callable `forward_loop(run)` that calls `run(inputs)` itself
    (the ModelOpt style). Raises CalibrationError when no batch ran or a batch holds NaN/Inf.
    """
    count = 0

    def run(inputs):
        nonlocal count
        _check_finite(inputs, count)
        program.run(inputs, f"calibration batch {count}")
        count += 1
        bar.update(1)

    with tqdm(total=total, desc="calibrating", unit="batch", disable=not progress, leave=False) as bar:
        if callable(batches):
            batches(run)
        else:
            for inputs in batches:
                run(inputs)
    if count == 0:
        raise CalibrationError("the calibration data was empty: pass at least one batch (e.g. "
                               "policy.calibration_batches(8)) or a forward_loop that calls run(inputs)")
    return count


def check_batches(calib: Any, example: Any) -> None:
    """Before any capture: an empty list, or a listed batch whose structure, dtypes, ranks or trailing shapes differ
    from the example inputs', is a CalibrationError. Lazy iterables and forward loops are checked as they run."""
    if not isinstance(calib, (list, tuple)):
        return
    if not calib:
        raise CalibrationError("the calibration data was empty: pass at least one batch (e.g. "
                               "policy.calibration_batches(8)) or a forward_loop that calls run(inputs)")
    want, want_spec = _flat(example)
    for index, batch in enumerate(calib):
        got, spec = _flat(batch)
        if spec != want_spec:
            raise CalibrationError(f"calibration batch {index} {_structure_gap(batch, example)}; build batches "
                                   "like the example inputs")
        _check_finite(batch, index)
        for i, (g, w) in enumerate(zip(got, want)):
            if isinstance(w, torch.Tensor) and not _same_kind(g, w):
                raise CalibrationError(f"calibration batch {index}, input {i}: {_describe(g)} but the example is "
                                       f"{_describe(w)}; convert or reshape the batch to match the example inputs")


def _structure_gap(batch: Any, example: Any) -> str:
    if isinstance(batch, dict) and isinstance(example, dict):
        missing, extra = sorted(set(example) - set(batch)), sorted(set(batch) - set(example))
        return f"lacks keys {missing} and has extra keys {extra} (the example has {sorted(example)})"
    return (f"has {len(_flat(batch)[0])} inputs where the example inputs have {len(_flat(example)[0])}, or "
            "another nesting")


def _flat(tree: Any):
    tree = (tree,) if isinstance(tree, torch.Tensor) else tree
    return torch.utils._pytree.tree_flatten(tree)


def _same_kind(got: Any, want: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.dim() == want.dim() \
        and got.shape[1:] == want.shape[1:]


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{str(t.dtype).replace('torch.', '')} [{'x'.join(map(str, t.shape))}]"


def _check_finite(inputs: Any, index: int) -> None:
    for leaf in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf; clean or re-normalise the data")
