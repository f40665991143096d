"""Property: for any supported width and block, each pass's online activation transform and folded weight pair up
exactly (float64 toy MLP through the real passes), and the graph gains only transparent qvla:: ops."""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from torch import nn

from qvla_compiler.passes.check_schedule import compute_schedule
from qvla_compiler.recipes import QuantRecipe
from toy_models import rotate_toy

WIDTHS = [8, 12, 16, 20, 24, 40, 48, 64, 96]


class GatedBlock(nn.Module):
    """x + down(silu(gate(n)) · up(n)), n = rms(x)·γ with outlier channels."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(d, dtype=torch.float64) + 0.5)
        self.gain.data[: max(1, d // 8)] *= 50.0
        self.gate = nn.Linear(d, h, dtype=torch.float64)
        self.up = nn.Linear(d, h, bias=False, dtype=torch.float64)
        self.down = nn.Linear(h, d, dtype=torch.float64)

    def forward(self, x):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        return x + self.down(F.silu(self.gate(n)) * self.up(n))


def _rotated(d, h, rotation, smooth, block, seed):
    torch.manual_seed(seed)
    model = GatedBlock(d, h).eval()
    batches = [(torch.randn(2, 5, d, dtype=torch.float64),) for _ in range(2)]
    gm, before, _ = rotate_toy(model, batches, QuantRecipe("t", layout="all", rotation=rotation, smooth=smooth,
                                                           rotation_block=block))
    return model, gm, before


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))  # shrinking re-exports: too slow
@given(d=st.sampled_from(WIDTHS), h=st.sampled_from(WIDTHS), block=st.sampled_from([2, 4, 8, 16, 32]),
       rotation=st.sampled_from(["hadamard", "duquant", "svd-hadamard"]), smooth=st.sampled_from(["none", "smoothquant"]),
       seed=st.integers(0, 1000))
def test_online_and_folded_pairs_are_exact(d, h, block, rotation, smooth, seed):
    model, gm, before = _rotated(d, h, rotation, smooth, block, seed)
    x = torch.randn(2, 5, d, dtype=torch.float64)  # capture_module fixes the shape
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
    assert compute_schedule(gm) == before  # only qvla::hadamard / qvla::block_rotate were added
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert f"qvla.{'hadamard' if rotation == 'hadamard' else 'block_rotate'}.default" in ops
    rotations = {n.meta["qvla"].rotation for n in gm.graph.nodes if n.meta.get("qvla") is not None}
    expected_in = {"smoothquant+" + rotation if smooth != "none" else rotation, rotation}
    assert rotations <= expected_in | {None}
