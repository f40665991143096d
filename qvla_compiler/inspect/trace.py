"""Pass tracing: the graph after each compiler phase, as files and as TORCH_TRACE artifacts.

With `--dump-dir` / `QVLA_DUMP=<dir>`, every phase writes `<phase>-<graph>.py` (gm.code). With `TORCH_TRACE=<dir>`,
each phase is also logged as a structured-trace artifact named `qvla_<phase>_<graph>` (the readable graph), so
`tlparse <dir>` shows our passes next to Dynamo's and Inductor's graphs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.fx as fx


def trace_phase(phase: str, graphs: dict[str, fx.GraphModule], directory: str | None) -> None:
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, gm in graphs.items():
            Path(directory, f"{phase}-{name}.py").write_text(gm.code)
    if not os.environ.get("TORCH_TRACE"):
        return
    try:
        from torch._logging._internal import trace_structured_artifact
    except ImportError:  # older or newer torch without the helper: files only
        return
    for name, gm in graphs.items():
        trace_structured_artifact(f"qvla_{phase}_{name}", "string",
                                  lambda gm=gm: gm.print_readable(print_output=False, include_stride=False))
