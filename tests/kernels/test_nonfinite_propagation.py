"""NaN/Inf activations propagate through every recipe exactly as in float: the token's outputs are non-finite."""
import pytest
import torch

import qvla_compiler
from qvla_compiler.kernels import ops
from qvla_compiler.quant.quantizers import quantize_weight

NAN_ROW, INF_ROW, NEG_INF_ROW = 1, 3, 4
# (w_bits, a_bits, static): the recipe kinds w8a8 dynamic, w8a8-static, w4a8, w4a4 (and their static variants)
KINDS = [(8, 8, False), (8, 8, True), (4, 8, False), (4, 8, True), (4, 4, False), (4, 4, True)]


def _poisoned(m=6, k=40):
    x = torch.randn(m, k)
    x[NAN_ROW, 7] = float("nan")
    x[INF_ROW, 0] = float("inf")
    x[NEG_INF_ROW, 39] = float("-inf")
    return x


def _quantized_linear(x, w, b, w_bits, a_bits, static):
    wq, ws = quantize_weight(w, w_bits, 16)
    xq, xs = ops.quantize_act(x, a_bits, torch.tensor([0.05]) if static else None)
    if w_bits == 8:
        return ops.int8_linear(xq, xs, wq, ws, b, torch.float32)
    return ops.int4_linear(xq, xs, wq, ws, b, 16, torch.float32)


@pytest.mark.parametrize("w_bits,a_bits,static", KINDS)
def test_op_level_rows_are_non_finite_exactly_where_float_is(w_bits, a_bits, static):
    x, w, b = _poisoned(), torch.randn(24, 40), torch.randn(24)
    ref = torch.nn.functional.linear(x, w, b)
    out = _quantized_linear(x, w, b, w_bits, a_bits, static)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.isnan(out[NAN_ROW]).all()
    assert torch.isfinite(out[[0, 2, 5]]).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True])
def test_reference_scale_is_nan_only_for_non_finite_rows(bits, static):
    x = _poisoned()
    q, s = ops.quantize_act_ref(x, bits, torch.tensor([0.05]) if static else None)
    assert torch.isnan(s[[NAN_ROW, INF_ROW, NEG_INF_ROW]]).all()
    finite = [0, 2, 5]
    q_f, s_f = ops.quantize_act_ref(x[finite], bits, torch.tensor([0.05]) if static else None)
    assert torch.equal(s[finite], s_f) and torch.equal(q[finite], q_f)  # finite rows: bit-identical to before
    fake = ops.quantize_act_ref(x, bits, None)[0].float() * s  # the fake-quant (q/dq) path poisons the same rows
    assert torch.equal(torch.isfinite(fake).all(-1), torch.isfinite(x).all(-1))


def test_end_to_end_w8a8_static_propagates_nan_and_inf():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(6, 8)
    qp = qvla_compiler.quantize(module, (x,), [(x,)], recipe="w8a8-static", layout="all", progress=False)
    code = "\n".join(gm.code for gm in qp.program.graphs.values())
    assert code.count("qvla.int8_linear") == 2 and "qvla.quantize_act" in code  # both linears are integer
    batch = torch.randn(6, 8)  # the export is for this batch size
    batch[1, 3] = float("nan")
    batch[3, 0] = float("inf")
    with torch.no_grad():
        want, got = module(batch), qp.module()(batch)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert not torch.isfinite(got[[1, 3]]).any() and torch.isfinite(got[[0, 2, 4, 5]]).all()
