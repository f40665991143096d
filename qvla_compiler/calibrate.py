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
        program.check_inputs(inputs, f"calibration batch {count}")  # names the batch; run() checks again, cheaply
        _check_finite(inputs, count)
        program.run(inputs)
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


def _check_finite(inputs: Any, index: int) -> None:
    for leaf in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf; clean or re-normalise the data")
