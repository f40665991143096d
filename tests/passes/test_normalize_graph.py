"""normalize_graph: in-place ops become functional, values stay bit-identical, aliased mutations stay put."""
import torch
from torch import nn

from qvla_compiler.export import capture_module
from qvla_compiler.passes.normalize_graph import normalize_graph


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "_guards" not in str(n.target)]


def _normalised(module, *args):
    gm = capture_module(module.eval(), args, canonical=False)["forward"]
    before = _ops(gm)
    with torch.no_grad():  # fresh copies: a kept input mutation must not leak into the second run
        ref = gm(*(a.clone() for a in args))
        normalize_graph(gm)
        out = gm(*(a.clone() for a in args))
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    return before, _ops(gm)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask):
        h = self.lin(x)
        h *= 0.5
        h.masked_fill_(mask, -1.0)
        h += x
        return h.relu_()


def test_inplace_chain_becomes_functional():
    before, after = _normalised(Chain(), torch.randn(2, 3, 8), torch.rand(2, 3, 8) > 0.5)
    assert before == ["aten.linear.default", "aten.mul_.Tensor", "aten.masked_fill_.Scalar", "aten.add_.Tensor",
                      "aten.relu_.default"]
    assert after == ["aten.linear.default", "aten.mul.Tensor", "aten.masked_fill.Scalar", "aten.add.Tensor",
                     "aten.relu.default"]


class PromotingAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x).to(torch.bfloat16)
        h += x  # bf16 += fp32 stays bf16 in place; add() alone would return fp32
        return h


def test_inplace_type_promotion_is_kept_with_a_cast():
    before, after = _normalised(PromotingAdd(), torch.randn(2, 3, 8))
    assert "aten.add_.Tensor" in before
    assert after[-2:] == ["aten.add.Tensor", "aten._to_copy.default"]


class ViewReadAfterMutation(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        v = h.view(2, 3, 2, 4)
        h.add_(1.0)  # v sees this: rewriting h alone would be wrong
        return v * 2


class InputMutation(nn.Module):
    def forward(self, x):
        x.mul_(2.0)  # visible to the caller
        return x + 1


def test_aliased_and_input_mutations_are_left_alone():
    for module in (ViewReadAfterMutation(), InputMutation()):
        before, after = _normalised(module, torch.randn(2, 3, 8))
        assert after == before and any(op.endswith("_.Tensor") for op in after)
