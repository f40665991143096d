"""lower_linears: op counts, shared activation quantization, float weights gone; check_schedule catches reorders."""
import collections

import pytest
import torch

import qvla_compiler
from qvla_compiler.errors import ScheduleError
from qvla_compiler.passes import check_schedule
from toy_models import ToyPolicyNet


def _lowered(recipe="w8a8", layout="all", **kw):
    net = ToyPolicyNet(**kw).eval()
    x = torch.randn(2, 6, 8)
    return qvla_compiler.quantize(net, (x,), [(x,)], recipe=recipe, layout=layout, progress=False), net


def _counts(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("recipe,op", [("w8a8", "qvla.int8_linear.default"), ("w4a4", "qvla.int4_linear.default")])
def test_every_linear_lowered_and_activation_quantization_shared(recipe, op):
    qp, net = _lowered(recipe)
    counts = _counts(qp.program.graphs["forward"])
    assert counts[op] == sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 17
    assert counts["aten.linear.default"] == 0
    # q/k/v share one quantized input per block, gate/up another: 17 linears read 11 distinct activations.
    assert counts["qvla.quantize_act.default"] == 11


def test_float_weights_of_integer_linears_are_gone():
    qp, _ = _lowered("w8a8")
    gm = qp.program.graphs["forward"]
    names = {n for n, _ in gm.named_parameters()}
    assert not any(n.endswith("q_proj.weight") for n in names)
    assert all(t.dtype == torch.int8 for n, t in gm.named_buffers() if n.endswith("_wq"))


def test_quantvla_layout_keeps_non_block_linears_float():
    qp, _ = _lowered("w8a8", layout="quantvla")
    counts = _counts(qp.program.graphs["forward"])
    assert counts["aten.linear.default"] == 3 and counts["qvla.int8_linear.default"] == 14


def test_check_schedule_rejects_a_reordered_graph():
    qp, _ = _lowered("w8a8")
    gm = qp.program.graphs["forward"]
    check_schedule(gm)  # the real pipeline's output passes
    silu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.silu.default)
    with gm.graph.inserting_after(silu):
        extra = gm.graph.call_function(torch.ops.aten.relu.default, (silu,))
    silu.replace_all_uses_with(extra)
    extra.replace_input_with(extra, silu)
    with pytest.raises(ScheduleError, match="aten.relu"):
        check_schedule(gm)
