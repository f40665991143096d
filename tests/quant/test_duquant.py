"""DuQuant: base rotation, exactness of the paired transforms, zigzag, and that it actually tames outliers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla_compiler.quant.duquant import (
    DuQuantTransform,
    calibrate_duquant,
    duquant_base_rotation,
    zigzag_permutation,
)
from qvla_compiler.errors import CalibrationError, ShapeError

F64 = torch.float64


def _sqnr(ref, q):
    return 20 * math.log10(ref.norm() / (ref - q).norm())


def _fake_quant_rows(x, bits=4):  # symmetric per row (per token for x, per output channel for W)
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (x / s).round().clamp(-qmax - 1, qmax) * s


def _outlier_data(t=128, d=256, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen, dtype=F64)
    x[:, [5, 77, d - 56]] *= 50  # three planted outlier channels
    w = torch.randn(n, d, generator=gen, dtype=F64) / math.sqrt(d)
    return x, w


@pytest.mark.parametrize("b", [1, 2, 8, 64, 128])
def test_base_rotation_is_orthogonal_with_uniform_first_row(b):
    r = duquant_base_rotation(b)
    torch.testing.assert_close(r @ r.T, torch.eye(b, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(r[0], torch.full((b,), 1 / math.sqrt(b), dtype=F64), atol=1e-12, rtol=0)


def test_zigzag_deals_boustrophedon():
    score = torch.arange(12, 0, -1).double()  # channel i has the (i+1)-th largest score
    perm = zigzag_permutation(score, 3)
    # sorted channels 0..11 dealt to blocks 0,1,2,2,1,0,0,1,2,2,1,0
    assert perm.tolist() == [0, 5, 6, 11, 1, 4, 7, 10, 2, 3, 8, 9]


@settings(max_examples=12, deadline=None)
@given(
    d_block=st.sampled_from([(96, 128), (96, 32), (384, 128), (64, 16), (60, 8), (48, 48)]),
    alpha=st.sampled_from([None, 0.6, 0.3]),
    n_weights=st.integers(1, 2),
    seed=st.integers(0, 3),
)
def test_property_exact_and_invertible(d_block, alpha, n_weights, seed):
    d, block = d_block
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, d, generator=gen, dtype=F64) * torch.rand(d, generator=gen, dtype=F64) * 10
    ws = [torch.randn(7, d, generator=gen, dtype=F64) for _ in range(n_weights)]
    t = calibrate_duquant(x, ws, block=block, steps=6, alpha=alpha, seed=seed)
    assert d % t.block == 0 and t.block <= block and t.rot1.shape == (d // t.block, t.block, t.block)
    assert sorted(t.perm.tolist()) == list(range(d))
    eye = torch.eye(t.block, dtype=F64)
    for rot in (t.rot1, t.rot2):
        torch.testing.assert_close(rot @ rot.transpose(1, 2), eye.expand_as(rot), atol=1e-10, rtol=0)
    xt = t.apply_to_activation(x)
    for w in ws:
        ref = x @ w.T
        torch.testing.assert_close(xt @ t.apply_to_weight(w).T, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    torch.testing.assert_close(t.invert_activation(xt), x, rtol=1e-9, atol=1e-9 * x.abs().max().item())
    torch.testing.assert_close(x @ t.matrix(), xt, rtol=1e-9, atol=1e-9 * xt.abs().max().item())


def test_block_choice_for_awkward_widths():
    x = torch.randn(8, 1536, dtype=F64)
    assert calibrate_duquant(x, torch.randn(4, 1536, dtype=F64), steps=1).block == 128
    x = torch.randn(8, 96, dtype=F64)
    assert calibrate_duquant(x, torch.randn(4, 96, dtype=F64), steps=1).block == 96


def test_reduces_outliers_and_quantization_error():
    x, w = _outlier_data()
    ref = x @ w.T
    t = calibrate_duquant(x, w, block=64, steps=32, alpha=0.6)
    t_rot = calibrate_duquant(x, w, block=64, steps=32, alpha=None)  # rotation + permutation only
    blocks = lambda z: z.reshape(z.shape[0], -1, 64).abs().amax((0, 2))  # noqa: E731
    for tr in (t, t_rot):
        xt = tr.apply_to_activation(x)
        assert xt.abs().max() < x.abs().max() / 4
        assert blocks(xt).max() < blocks(x).max() / 4
    xr = t_rot.apply_to_activation(x)
    # the permutation balances the rotated per-block peaks
    assert blocks(xr).max() / blocks(xr).min() < blocks(x).max() / blocks(x).min()
    base_a4 = _sqnr(ref, _fake_quant_rows(x) @ w.T)
    base_w4a4 = _sqnr(ref, _fake_quant_rows(x) @ _fake_quant_rows(w).T)
    for tr, a4_gain, w4a4_gain in ((t_rot, 3.0, 2.0), (t, 10.0, 8.0)):  # measured: +4.0/+2.8, +13.8/+12.3 dB
        xt, wt = tr.apply_to_activation(x), tr.apply_to_weight(w)
        assert _sqnr(ref, _fake_quant_rows(xt) @ wt.T) > base_a4 + a4_gain
        assert _sqnr(ref, _fake_quant_rows(xt) @ _fake_quant_rows(wt).T) > base_w4a4 + w4a4_gain


def test_seeded_and_deterministic():
    x, w = _outlier_data(t=32, d=128, n=8)
    a, b = (calibrate_duquant(x, w, block=64, steps=4, seed=1) for _ in range(2))
    assert torch.equal(a.rot1, b.rot1) and torch.equal(a.perm, b.perm) and torch.equal(a.rot2, b.rot2)
    assert isinstance(a, DuQuantTransform)


def test_float32_activation_and_errors():
    x, w = _outlier_data(t=16, d=128, n=8)
    t = calibrate_duquant(x.float(), w.float(), block=64, steps=2)
    y = t.apply_to_activation(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y @ t.apply_to_weight(w.float()).T, (x @ w.T).float(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ShapeError):
        calibrate_duquant(x, torch.randn(4, 100))
    with pytest.raises(CalibrationError):
        calibrate_duquant(x[:0], w)
    with pytest.raises(CalibrationError):
        calibrate_duquant(torch.full_like(x, float("nan")), w)
