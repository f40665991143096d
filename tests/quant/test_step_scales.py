"""Per-flow-step static activation scales: bucket math, the observer's per-step statistics, qvla::step_scale."""
import pytest
import torch

from qvla_compiler.errors import CalibrationError
from qvla_compiler.kernels.step_scale import step_scale_ref
from qvla_compiler.quant.observers import ActObserver
from qvla_compiler.quant.quantizers import _ACT_RATIOS, mse_clip_scale
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


def _grid_error(values, weights, scale, qmax):
    return float((weights * (torch.clamp(torch.round(values / scale), max=qmax) * scale - values).pow(2)).sum())


def test_mse_clip_scale_is_the_best_of_its_grid_and_clips_heavy_tails_at_4_bits():
    values = torch.randn(20000, generator=torch.Generator().manual_seed(0)).abs() ** 2  # a heavy-tailed |x|
    weights = torch.ones_like(values)
    got = mse_clip_scale(values, weights, qmax=7)
    top = values.max()
    grid = [top * r / 7 for r in _ACT_RATIOS]
    assert _grid_error(values, weights, got, 7) == min(_grid_error(values, weights, s, 7) for s in grid)
    assert got < 0.5 * top / 7  # clips: the max would waste most of 4 bits' levels on the tail
    heavy = weights.clone()
    heavy[values.argmax()] = 1e9  # a rare value that matters (an attention sink's activation) is not clipped
    assert torch.equal(mse_clip_scale(values, heavy, qmax=7), top / 7)


def test_per_step_scales_are_chosen_per_bucket_and_fill_unseen_buckets():
    bounds = step_bounds([0.25, 0.5, 0.75])
    values = torch.tensor([1.0, 2.0, 8.0, 4.0])
    times = torch.tensor([0.25, 0.25, 0.75, 0.74])
    got = per_step_scales(values, torch.ones(4), times, bounds, qmax=127)
    # at 8 bits, two or three values are represented best by a scale whose grid holds the largest exactly
    assert torch.equal(got, torch.tensor([2.0, 8.0, 8.0]) / 127)  # bucket 1 (t=0.5) unseen: all values' scale


def test_observer_keeps_per_step_statistics_and_one_scale_without_time():
    obs = ActObserver("probe")
    x = torch.zeros(2, 3, 4)
    x[0, :, 0], x[1, :, 0] = 1.0, 10.0  # sample 0 at t=0.1 is small, sample 1 at t=0.9 large
    obs(x, torch.tensor([0.1, 0.9]))
    obs(torch.full((2, 3, 4), 3.0), torch.tensor([0.5, 0.5]))
    got = obs.step_scales(qmax=127, bounds=step_bounds([0.1, 0.5, 0.9]))
    assert torch.equal(got, torch.tensor([1.0, 3.0, 10.0]) / 127)
    assert torch.equal(obs.tensor_scale(qmax=127), torch.tensor([10.0 / 127]))  # 10 is the costliest to clip
    plain = ActObserver("probe")
    plain(x)
    assert plain.step_scales(127, step_bounds([0.1, 0.5, 0.9])) is None  # no flow time: dynamic scales


def test_observer_sample_sees_every_token_peak_and_is_reproducible():
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1))
    x[17, 5] = 1000.0  # one element in 262144: the random draw alone would almost surely miss it
    a, b = ActObserver("probe"), ActObserver("probe")
    a(x), b(x)
    assert a.values[0][0].max() == 1000.0
    assert all(torch.equal(u, v) for u, v in zip(a.values[0][:2], b.values[0][:2]))
    assert float(a.values[0][1].sum()) == pytest.approx(x.numel() + x.shape[0])  # draws stand for every element


def test_observer_refuses_per_step_scales_when_tokens_of_samples_are_flattened():
    obs = ActObserver("probe.linear")
    obs(torch.ones(6, 4), torch.tensor([0.1, 0.9]))
    with pytest.raises(CalibrationError, match="probe.linear.*per-step"):
        obs.step_scales(127, step_bounds(TIMESTEPS))


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
