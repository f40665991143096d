"""Per-phase wall time and peak memory: each phase's peak is its own, nested phases cover their children, and
nothing is recorded (or costs anything) without an active PhaseLog."""
import sys

import pytest
import torch

from qvla_compiler.inspect.phases import PhaseLog, phase, reset_peak

LINUX_PEAKS = pytest.mark.skipif(not sys.platform.startswith("linux") or not reset_peak(),
                                 reason="needs /proc/self/clear_refs to reset the peak RSS (Linux)")


@LINUX_PEAKS
def test_a_phase_peak_is_its_own_not_the_process_peak_so_far():
    with PhaseLog() as log:
        with phase("allocates 800 MB"):
            big = torch.ones(200_000_000)  # 800 MB, touched
            del big
        with phase("allocates nothing"):
            torch.zeros(10)
    big, small = log.phases
    assert (big.name, small.name) == ("allocates 800 MB", "allocates nothing")
    assert big.own_peak and small.own_peak
    assert big.peak_rss_gb - small.peak_rss_gb > 0.7  # the second phase does not inherit the first one's peak
    assert big.rss_after_gb < big.peak_rss_gb - 0.7  # freed before the phase ended
    assert log.peak_rss_gb == big.peak_rss_gb


@LINUX_PEAKS
def test_an_outer_phase_covers_the_peaks_of_its_inner_phases():
    with PhaseLog() as log:
        with phase("outer"):
            with phase("inner"):
                big = torch.ones(100_000_000)  # 400 MB
                del big
    inner, outer = log.phases
    assert (inner.name, outer.name) == ("inner", "outer")
    assert outer.peak_rss_gb >= inner.peak_rss_gb and outer.seconds >= inner.seconds


def test_phases_outside_a_log_are_not_recorded():
    with PhaseLog() as log:
        with phase("inside"):
            pass
    with phase("after the log closed"):  # the log stops listening when its block ends
        pass
    assert [p["name"] for p in log.as_json()] == ["inside"]


def test_each_phase_is_reported_as_it_ends():
    ended = []
    with PhaseLog(on_end=lambda cost: ended.append(cost.name)) as log:
        with phase("first"):
            assert ended == []
        with phase("second"):
            assert ended == ["first"]  # a run killed during "second" has already shown "first"
    assert ended == ["first", "second"] == [p.name for p in log.phases]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (Linux)")
def test_a_phase_hands_the_heap_pages_it_freed_back_to_the_os():
    from qvla_compiler.inspect.phases import rss_gb

    kept, freed = [], []
    with PhaseLog(), phase("fragments the heap"):
        for _ in range(2400):  # 240 MB in 100 kB blocks (under glibc's smallest mmap threshold, so on the heap),
            freed.append(torch.ones(25_000))  # each followed by one that stays: the heap cannot shrink from its top
            kept.append(torch.ones(16))
        before = rss_gb()
        del freed
        held = rss_gb()
    after = rss_gb()
    if held < before - 0.2:
        pytest.skip("this allocator returned the freed pages by itself")
    assert after < held - 0.2  # the phase's end gave the ~240 MB back
