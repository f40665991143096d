"""Where a compile spends its time and memory: wall seconds and peak resident memory per phase.

The compiler marks its phases with `phase("calibrate: observe")`; they cost nothing unless a `PhaseLog` is recording
(`with PhaseLog() as log: ...`; the CLI records one for every `qvla quantize` and puts it in `--json`). Peak RSS per
phase: on Linux the kernel's high-water mark (VmHWM) is reset at the start of each phase (writing 5 to
/proc/self/clear_refs), so a phase's peak is its own, not the largest of everything before it. Where that reset is
not available the figure is the process peak so far (`resource.getrusage`), and `PhaseCost.own_peak` says so.
Phases nest ("calibrate" contains "calibrate: observe"); each records its own span.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

_GB = 1e9
_ACTIVE: contextvars.ContextVar["PhaseLog | None"] = contextvars.ContextVar("qvla_phase_log", default=None)


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    name: str
    seconds: float
    peak_rss_gb: float  # the largest resident set during the phase (see own_peak)
    rss_after_gb: float  # resident set when the phase ended
    own_peak: bool  # False: peak_rss_gb is the process peak so far (the kernel's peak could not be reset)


class PhaseLog:
    """Records the phases run inside `with PhaseLog() as log:`; `log.phases` in the order they ended."""

    def __init__(self, on_end: Callable[[PhaseCost], None] | None = None) -> None:
        """`on_end(cost)`: called as each phase ends (the CLI prints it, so a run killed for memory shows how far
        it got)."""
        self.phases: list[PhaseCost] = []
        self.on_end = on_end
        self._token = None

    def __enter__(self) -> "PhaseLog":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    @property
    def peak_rss_gb(self) -> float:
        """The largest resident set over every recorded phase (NaN when none ran)."""
        return max((p.peak_rss_gb for p in self.phases), default=float("nan"))

    def as_json(self) -> list[dict]:
        return [dataclasses.asdict(p) for p in self.phases]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time `name` and its peak memory into the active PhaseLog, if any. Inner phases reset the kernel's peak, so
    an outer phase's peak is the largest of its own reading and its inner phases' peaks."""
    log = _ACTIVE.get()
    if log is None:
        yield
        return
    first = len(log.phases)
    own = reset_peak()
    start = time.perf_counter()
    yield
    release_free_heap()
    seconds = time.perf_counter() - start
    inner = [p.peak_rss_gb for p in log.phases[first:]]
    peak = max([peak_rss_gb(), *inner])
    log.phases.append(PhaseCost(name, round(seconds, 2), round(peak, 3), round(rss_gb(), 3), own))
    if log.on_end is not None:
        log.on_end(log.phases[-1])


def release_free_heap() -> bool:
    """Free what a phase left unreachable and give the C heap's free pages back to the OS (glibc's malloc_trim);
    False where there is no such call.

    Why at every recorded phase end (a compile run with a PhaseLog, as `qvla quantize`; ~0.2 s each, mostly the
    collector, too much for the many small compiles of a test run): a dropped GraphModule (the calibration fork, with
    its observers and integer copies) is a reference cycle, so its tensors live until the cyclic collector happens to
    run; and tensors under glibc's mmap threshold live on the heap, whose freed pages stay resident. On groot-full,
    calibrate ended at 5.82 GB resident before this and the plan's sharing of the fork's tensors, 4.70 GB after
    (benchmarks/RESULTS.md §14c)."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None)  # the C library the process already has loaded
    except OSError:
        return None


def reset_peak() -> bool:
    """Reset the kernel's resident high-water mark of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident memory since the last reset_peak (Linux), else the process's peak so far."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024 / _GB
    return process_peak_rss_gb()


def process_peak_rss_gb() -> float:
    """The process's peak resident memory (getrusage; on Linux reset_peak resets this one too)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _GB if sys.platform == "darwin" else peak * 1024 / _GB  # macOS reports bytes, Linux KiB


def rss_gb() -> float:
    rss = _status_kb("VmRSS")
    return float("nan") if rss is None else rss * 1024 / _GB


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
