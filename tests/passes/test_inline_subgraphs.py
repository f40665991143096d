"""inline_subgraphs: autocast and grad-mode blocks of a captured forward are inlined with autocast's casts made
explicit — the same values bit for bit, every linear visible — and linears in other subgraphs warn."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvla_compiler
from qvla_compiler.export import capture_module
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.inline_subgraphs import SubgraphLinearsWarning, inline_subgraphs


class MixedBlocks(nn.Module):
    """Autocast around a LayerNorm with fp32 gains, linears, an explicit fp32 softmax and a nested block with
    autocast off; then a bf16 block fed an fp32 and a bf16 tensor; then an enable_grad block."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.c, self.d = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.a(self.norm(x))
            p = torch.softmax(h.float(), dim=-1)
            with torch.autocast("cpu", enabled=False):
                y = self.b(F.gelu(p))  # fp32: autocast is off here
            z = self.c(y) @ self.d(x).transpose(-1, -2)  # bf16 matmul of two bf16 linears
        with torch.enable_grad():
            w = self.d(y)
        return y + z.float().sum(-1, keepdim=True) + w


def _hops(gm):
    return [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]


def test_autocast_and_grad_blocks_inline_bit_identical():
    torch.manual_seed(0)
    module, x = MixedBlocks().eval(), torch.randn(2, 5, 16)
    gm = capture_module(module, (x,), None, canonical=False)["forward"]
    assert _hops(gm)  # torch.export keeps the blocks as subgraphs
    with torch.no_grad():
        before = gm(x)
        inline_subgraphs(gm)
        assert not _hops(gm) and len(g.linear_nodes(gm)) == 5
        assert torch.equal(gm(x), before) and torch.equal(gm(x), module(x))
    casts = [n for n in gm.graph.nodes if n.target == g.aten._to_copy.default and n.kwargs["dtype"] == torch.bfloat16]
    assert casts, "autocast's input casts are explicit in the graph"


def test_an_autocast_module_quantizes_every_linear():
    torch.manual_seed(0)
    module, x = MixedBlocks().eval(), torch.randn(2, 5, 16)
    qp = qvla_compiler.quantize(module, (x,), [(torch.randn(2, 5, 16),)], "w8a8", layout="all", progress=False)
    assert sum(r.bits != "float" for r in qp.report.linears) == 5
    assert qp.report.action_rel_l2 < 0.05


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda v: self.up(v), lambda v: self.down(v), (x,))


def test_linears_inside_a_cond_stay_float_with_a_warning():
    with pytest.warns(SubgraphLinearsWarning, match="stay float"):
        capture_module(Branches().eval(), (torch.randn(2, 8),), None, dynamic_batch=False)


def test_a_graph_without_blocks_is_untouched_and_silent():
    gm = capture_module(nn.Sequential(nn.Linear(8, 8)).eval(), (torch.randn(2, 8),), None, canonical=False)["forward"]
    code = gm.code
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubgraphLinearsWarning)
        inline_subgraphs(gm)
    assert gm.code == code


def test_a_policy_whose_denoise_step_runs_under_autocast_quantizes_like_the_plain_one(tmp_path):
    """GR00T samples under bf16 autocast: the same policy with its denoise step in an autocast block gets the same
    integer linears as without it, and its saved program loads bit-identical."""
    from qvla_compiler.models import build_policy

    policy, plain = build_policy("pi05-tiny"), build_policy("pi05-tiny")

    class AutocastPolicy(type(policy)):
        def denoise_step(self, prefix, x_t, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().denoise_step(prefix, x_t, t).float()

    policy.__class__ = AutocastPolicy
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe="w8a8", calib_steps=1, progress=False)
    want = qvla_compiler.quantize(plain, plain.example_inputs(), recipe="w8a8", calib_steps=1, progress=False)
    assert qp.report.int_linears == want.report.int_linears > 0 and qp.report.action_rel_l2 < 0.05
    obs, noise = policy.example_inputs(), policy.example_noise(2)
    args = (*(obs[k] for k in ("images", "tokens", "token_mask", "state")), noise)
    loaded = qvla_compiler.load(qp.save(tmp_path / "autocast.pt2")).module(compiled=False)
    assert torch.equal(loaded(*args), qp.module(compiled=False)(*args))
