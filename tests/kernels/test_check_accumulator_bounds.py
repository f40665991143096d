"""check_accumulator_bounds: K * qmax_a * qmax_w per integer linear, recorded through lowering; refuses int4 groups
whose int32 accumulator no kernel splits. (Lives beside the kernels whose bounds it proves.)"""
import pytest
import torch

import qvla_compiler
from qvla_compiler.errors import AccumulatorOverflowError
from qvla_compiler.meta import LinearInfo, QuantSpec
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.check_accumulator_bounds import (ACC_META, INT4_GROUP_LIMIT, accumulator_bound,
                                                           check_accumulator_bounds)

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("qa,qw,limit", [(127, 127, 133_144), (127, 7, 2_415_617), (7, 7, 43_826_196)])
def test_bound_at_the_int32_edge(qa, qw, limit):
    assert limit * qa * qw <= INT32_MAX < (limit + 1) * qa * qw  # limit is exactly the int32 edge
    at, past = accumulator_bound(limit, qa, qw), accumulator_bound(limit + 1, qa, qw)
    assert (at.max_chunk_k, at.worst, at.needs_k_split) == (limit, limit * qa * qw, False)
    assert past.needs_k_split and past.worst == (limit + 1) * qa * qw


def _exported_linear(in_features, spec):
    gm = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).module()
    (node,) = g.linear_nodes(gm)
    node.meta["qvla"] = LinearInfo("proj", in_features, 2, spec=spec)  # the annotation is what the pass reads
    return gm, node


def test_records_split_and_leaves_graph_unchanged():
    gm, node = _exported_linear(200_000, QuantSpec(8, 8))
    before = gm.code
    check_accumulator_bounds(gm)
    assert gm.code == before
    assert node.meta[ACC_META].needs_k_split and node.meta[ACC_META].max_chunk_k == 133_144


def test_float_linear_gets_no_record():
    gm, node = _exported_linear(200_000, None)
    check_accumulator_bounds(gm)
    assert ACC_META not in node.meta


def test_int4_group_no_kernel_splits_is_refused():
    gm, _ = _exported_linear(2 * INT4_GROUP_LIMIT + 4, QuantSpec(4, 8, group_size=INT4_GROUP_LIMIT + 1))
    with pytest.raises(AccumulatorOverflowError, match="group_size <= 2097151"):
        check_accumulator_bounds(gm)
    ok, node = _exported_linear(2 * INT4_GROUP_LIMIT + 4, QuantSpec(4, 8, group_size=-1))  # per channel: chunked
    check_accumulator_bounds(ok)
    assert node.meta[ACC_META].needs_k_split


def test_pipeline_records_and_the_lowered_linear_is_exact_past_int32():
    """K = 133,145 at the grid's ends (every q = 127): the int32 sum would wrap to a negative number."""
    k = 133_145
    module = torch.nn.Linear(k, 2, bias=False)
    with torch.no_grad():
        module.weight.fill_(1e-3)
    x = torch.ones(1, k)
    qp = qvla_compiler.quantize(module, (x,), [(x,)], recipe="w8a8", layout="all", progress=False)
    lowered = [n for gm in qp.program.graphs.values() for n in gm.graph.nodes if ACC_META in n.meta]
    assert [n.target for n in lowered] == [torch.ops.qvla.int8_linear.default]
    assert lowered[0].meta[ACC_META].needs_k_split
    want = (x.double() @ module.weight.double().t()).float()  # 133.145; fp32 linear itself drifts by 2e-4 here
    torch.testing.assert_close(qp.module()(x), want, rtol=1e-6, atol=0)  # an int32 wrap would give -133.1


def test_int4_weight_bound_counts_the_level_below_minus_seven():
    """A 4-bit weight is stored on [-8, 7] (quantizers.weight_low), so its bound is 8, not the symmetric 7."""
    gm, node = _exported_linear(1024, QuantSpec(4, 8, group_size=128))
    check_accumulator_bounds(gm)
    assert (node.meta[ACC_META].qmax_w, node.meta[ACC_META].worst) == (8, 1024 * 127 * 8)
