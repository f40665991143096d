"""Per-flow-step static activation scales: bucket math, the observer's per-step statistics, qvla::step_scale."""
import pytest
import torch

from qvla_compiler.errors import CalibrationError
from qvla_compiler.kernels.step_scale import step_scale_ref
from qvla_compiler.quant.observers import ActObserver
from qvla_compiler.quant.step_scales import bucket_of, per_step_scales, row_times, step_bounds

TIMESTEPS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # a 10-step flow schedule, as the policies run it


def test_every_timestep_is_its_own_bucket_and_other_times_go_to_the_nearest():
    bounds = step_bounds(TIMESTEPS)
    assert torch.allclose(bounds, torch.tensor([0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]))
    assert bucket_of(torch.tensor(TIMESTEPS), bounds).tolist() == list(range(9, -1, -1))
    assert bucket_of(torch.tensor([0.0, 0.12, 0.87, 2.0]), bounds).tolist() == [0, 0, 8, 9]
    assert step_bounds([0.5]).numel() == 0 and bucket_of(torch.tensor([0.3]), step_bounds([0.5])).tolist() == [0]


def test_row_times_follow_each_sample_and_refuse_flattened_tokens():
    t = torch.tensor([0.1, 0.9])
    assert row_times(torch.zeros(2, 3, 4), t).tolist() == pytest.approx([0.1] * 3 + [0.9] * 3)
    assert row_times(torch.zeros(2, 4), t).tolist() == pytest.approx([0.1, 0.9])
    assert row_times(torch.zeros(5, 4), torch.tensor(0.3)).tolist() == pytest.approx([0.3] * 5)
    assert row_times(torch.zeros(6, 4), t) is None  # 2 samples × 3 tokens flattened: which row is which sample?


def test_per_step_scales_take_each_bucket_percentile_and_fill_unseen_buckets():
    bounds = step_bounds([0.25, 0.5, 0.75])
    absmax = torch.tensor([1.0, 2.0, 8.0, 4.0])
    times = torch.tensor([0.25, 0.25, 0.75, 0.74])
    got = per_step_scales(absmax, times, bounds, qmax=127, percentile=100)
    assert torch.equal(got, torch.tensor([2.0, 8.0, 8.0]) / 127)  # bucket 1 (t=0.5) unseen: all tokens' max


def test_observer_keeps_per_step_statistics_and_one_scale_without_time():
    obs = ActObserver("probe")
    x = torch.zeros(2, 3, 4)
    x[0, :, 0], x[1, :, 0] = 1.0, 10.0  # sample 0 at t=0.1 is small, sample 1 at t=0.9 large
    obs(x, torch.tensor([0.1, 0.9]))
    obs(torch.full((2, 3, 4), 3.0), torch.tensor([0.5, 0.5]))
    got = obs.step_scales(qmax=127, percentile=100, bounds=step_bounds([0.1, 0.5, 0.9]))
    assert torch.equal(got, torch.tensor([1.0, 3.0, 10.0]) / 127)
    plain = ActObserver("probe")
    plain(x)
    assert plain.step_scales(127, 100, step_bounds([0.1, 0.5, 0.9])) is None  # no flow time: dynamic scales


def test_observer_refuses_per_step_scales_when_tokens_of_samples_are_flattened():
    obs = ActObserver("probe.linear")
    obs(torch.ones(6, 4), torch.tensor([0.1, 0.9]))
    with pytest.raises(CalibrationError, match="probe.linear.*per-step"):
        obs.step_scales(127, 100, step_bounds(TIMESTEPS))


@pytest.mark.parametrize("t_shape, rank", [((), 1), ((), 3), ((1,), 2), ((3,), 2), ((5,), 3), ((7,), 4)])
def test_step_scale_op_matches_reference_and_broadcasts_over_the_batch(t_shape, rank):
    table, bounds = torch.rand(10) + 0.1, step_bounds(TIMESTEPS)
    t = torch.rand(t_shape)
    got = torch.ops.qvla.step_scale(table, bounds, t, rank)
    want = step_scale_ref(table, bounds, t, rank)
    assert torch.equal(got, want) and got.dim() == rank
    flat_t = t.reshape(-1)
    assert torch.equal(got.reshape(-1), table[torch.bucketize(flat_t, bounds)])
    x_shape = (flat_t.numel(), *([6] * (rank - 2)), 16)[:rank] if rank > 1 else (16,)  # an activation of rank `rank`
    assert torch.broadcast_shapes(got.shape, (*x_shape[:-1], 1)) == (*x_shape[:-1], 1)  # as quantize_act expands it


def test_step_scale_opcheck():
    torch.library.opcheck(torch.ops.qvla.step_scale.default, (torch.rand(10), step_bounds(TIMESTEPS),
                                                               torch.rand(3), 3))
