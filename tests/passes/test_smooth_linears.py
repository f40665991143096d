"""smooth_linears: Before/Expected on toy blocks; folded only where a constant norm gain exists."""
import torch
from torch import nn

from qvla_compiler.passes.check_schedule import compute_schedule
from qvla_compiler.recipes import QuantRecipe
from toy_models import rotate_toy


class NormThenLinears(nn.Module):
    """layer_norm(x) → q, k; `affine=False` is the negative case (nothing to fold 1/s into)."""

    def __init__(self, affine: bool, d: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=affine, dtype=torch.float64)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.weight[3] = 40.0  # an outlier channel for SmoothQuant to migrate
                self.norm.bias.uniform_(-0.1, 0.1)
        self.q = nn.Linear(d, d, dtype=torch.float64)
        self.k = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x):
        n = self.norm(x)
        return self.q(n) * self.k(n)


def _smoothed(affine: bool):
    torch.manual_seed(0)
    model = NormThenLinears(affine).eval()
    batches = [(torch.randn(2, 6, 16, dtype=torch.float64),)]
    gm, before, code_before = rotate_toy(model, batches, QuantRecipe("t", layout="all", smooth="smoothquant",
                                                                     smooth_alpha=0.5))
    return model, gm, before, code_before, batches[0][0]


def test_fold_into_layernorm_gain_and_bias():
    model, gm, before, _, x = _smoothed(affine=True)
    assert compute_schedule(gm) == before  # no online op: the scales live in the norm and the weights
    assert {n.meta["qvla"].rotation for n in gm.graph.nodes if n.meta.get("qvla")} == {"smoothquant"}
    norm = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.layer_norm.default)
    assert all(a.target.startswith("qvla_rot_smooth_") for a in norm.args[2:4])
    gain = getattr(gm, norm.args[2].target)
    assert gain.abs().max() < 40.0 / 2  # the outlier channel was divided down
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)


def test_no_affine_gain_means_no_smoothing():
    model, gm, before, code_before, x = _smoothed(affine=False)
    assert {n.meta["qvla"].rotation for n in gm.graph.nodes if n.meta.get("qvla")} == {None}
    assert gm.code == code_before  # Expected = Before
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
