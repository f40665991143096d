"""SVD·Hadamard (quant/svd_hadamard.py): exact in float, and every rotated column of a block carries the block's
mean weight energy — the property the composite is for; neither factor alone has it."""
import pytest
import torch

from qvla_compiler.quant.hadamard import hadamard_matrix
from qvla_compiler.quant.svd_hadamard import block_pca_bases, calibrate_svd_hadamard, svd_hadamard_block


def _layer(d: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    x[:, 3] *= 40.0  # an outlier channel
    w = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64) * 3
    return x, w


@pytest.mark.parametrize("d,n,block", [(96, 17, 32), (48, 5, 64), (40, 33, 128), (256, 64, 128), (24, 7, 1000)])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_pair_is_exact(d, n, block, alpha):
    x, w = _layer(d, n, seed=d + n)
    t = calibrate_svd_hadamard(x, [w, w[:3] * 2], block=block, alpha=alpha)
    torch.testing.assert_close(t.apply_to_activation(x) @ t.apply_to_weight(w).T, x @ w.T, rtol=1e-10, atol=1e-10)
    m = t.matrix()  # without smoothing an orthogonal matrix
    if alpha is None:
        torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(t.invert_activation(t.apply_to_activation(x)), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d,block", [(128, 32), (96, 48), (64, 64)])
def test_block_columns_carry_equal_energy(d, block):
    _, w = _layer(d, 50, seed=block)
    weights = [w, w[:7] * -0.5]
    t = calibrate_svd_hadamard(torch.zeros(1, d), weights, block=block, alpha=None)
    b = t.rot1.shape[-1]
    stacked = torch.cat(weights)
    energy = t.apply_to_weight(stacked).pow(2).sum(0).reshape(-1, b)
    expected = stacked.pow(2).sum(0).reshape(-1, b).mean(1, keepdim=True)
    torch.testing.assert_close(energy, expected.expand_as(energy), rtol=1e-10, atol=0)
    # neither factor alone equalises: the PCA basis concentrates energy, the Hadamard alone keeps the spread
    pca_only = (stacked.reshape(stacked.shape[0], -1, b).transpose(0, 1) @ block_pca_bases(weights, b)).pow(2).sum(1)
    had_only = (stacked.reshape(stacked.shape[0], -1, b) @ hadamard_matrix(b)).pow(2).sum(0)
    for other in (pca_only, had_only):
        assert (other.amax(1) / other.amin(1)).min() > 1.5


def test_block_size_is_a_hadamard_divisor():
    assert svd_hadamard_block(1024, 128) == 128
    assert svd_hadamard_block(96, 128) == 96  # 12·8: a Paley base times a power of two
    assert svd_hadamard_block(2 * 7, 128) == 2  # 7 and 14 have no Hadamard matrix
    assert svd_hadamard_block(48, 32) == 24
