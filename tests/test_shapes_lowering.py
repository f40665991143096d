"""Real-policy shapes through quantize → lower → save: one weight read by several call sites, and outputs that are
tuples, dicts or nested pytrees of tensors (K/V caches) rather than one tensor."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvla_compiler
from qvla_compiler.export import capture_module
from qvla_compiler.meta import update
from qvla_compiler.passes import apply_layout, assign_regions, classify_linears, quantize_linears
from qvla_compiler.passes.quantize_linears import KEPT_FLOAT
from qvla_compiler.recipes import resolve_recipe
from qvla_compiler.inspect.report import output_fidelity


class TwiceHead(nn.Module):
    """An unrolled two-step sampler: the same head reads two different activations."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(16, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        return self.head(F.gelu(self.head(h)) * 3.0)


def _int_ops(gm):
    return [n for n in gm.graph.nodes if str(n.target) == "qvla.int8_linear.default"]


@pytest.fixture(scope="module")
def twice():
    torch.manual_seed(0)
    net, x = TwiceHead().eval(), torch.randn(4, 16)
    qp = qvla_compiler.quantize(net, (x,), [(torch.randn(4, 16),)], recipe="w8a8-static", layout="all",
                                progress=False)
    return net, x, qp


def test_shared_weight_is_quantized_once_and_every_call_site_lowered(twice):
    net, x, qp = twice
    gm = qp.program.graphs["forward"]
    wq = [name for name, _ in gm.named_buffers() if name.endswith("_wq")]
    assert sorted(wq) == ["qvla_head_wq", "qvla_inp_wq"]  # one integer weight for the head's two call sites
    ops = _int_ops(gm)
    assert len(ops) == 3 and not any(str(n.target) == "aten.linear.default" for n in gm.graph.nodes)
    head_sites = [n for n in ops if n.args[2].target == "qvla_head_wq"]
    assert len(head_sites) == 2 and head_sites[0].args[2] is head_sites[1].args[2]
    # Static activation scales are per call site: each one's observer saw different inputs.
    xs = [n.args[0].args[0].args[2].target for n in head_sites]
    assert len(set(xs)) == 2 and not torch.equal(getattr(gm, xs[0]), getattr(gm, xs[1]))
    assert not hasattr(gm.head, "weight")
    with torch.no_grad():
        assert output_fidelity(net(x), qp.module()(x))[1] > 25


def test_shared_weight_bytes_are_counted_once(twice):
    _, _, qp = twice
    rows = collections.defaultdict(list)
    for r in qp.report.linears:
        rows[r.module_path].append(r)
    head = rows["head"]
    assert [r.call_site for r in head] == [0, 1]
    assert head[0].bytes_bf16 == 2 * (32 * 32 + 32) and head[1].bytes_bf16 == head[1].bytes_quant == 0
    assert qp.report.bytes_bf16 == qp.report.policy_bytes_bf16 == 2 * (16 * 32 + 32 + 32 * 32 + 32)
    assert 0 < qp.report.policy_bytes_quant < qp.report.policy_bytes_bf16
    assert qp.report.policy_bytes_quant == qp.report.bytes_quant


def test_shared_weight_with_a_float_call_site_stays_float_with_a_reason():
    torch.manual_seed(0)
    gm = capture_module(TwiceHead().eval(), (torch.randn(4, 16),))["forward"]
    classify_linears(gm)
    assign_regions(gm)
    apply_layout(gm, resolve_recipe("w8a8", "all"))
    first, second = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)][1:]
    update(second, spec=None)  # e.g. another region or role whose layout keeps it float
    quantize_linears(gm)
    assert first.meta["qvla"].spec is None and "qvla_tensors" not in first.meta
    assert "shared with call site(s) the layout keeps float" in first.meta[KEPT_FLOAT].reason
    assert not any(name.startswith("qvla_head") for name, _ in gm.named_buffers())


class KVCache(nn.Module):
    """Returns a pytree: the output plus a dict of per-layer (K, V) caches and a non-tensor leaf."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
        return self.o(att) + x, {"layer0": (k, v), "pos": x.shape[1]}


@pytest.fixture(scope="module")
def kv():
    torch.manual_seed(0)
    net, x = KVCache().eval(), torch.randn(2, 5, 16)
    qp = qvla_compiler.quantize(net, x, [(torch.randn(2, 5, 16),)], recipe="w8a8", layout="all", progress=False)
    return net, x, qp


def test_pytree_output_keeps_its_structure_and_fidelity_covers_every_leaf(kv):
    net, x, qp = kv
    with torch.no_grad():
        ref, out = net(x), qp.module()(x)
    assert torch.utils._pytree.tree_structure(out) == torch.utils._pytree.tree_structure(ref)
    assert out[1]["pos"] == 5 and out[1]["layer0"][0].shape == (2, 5, 16)
    assert qp.report.int_linears == 4 and qp.example_args[0] is x
    leaves = [t.double().reshape(-1) for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    got = [t.double().reshape(-1) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    r, o = torch.cat(leaves), torch.cat(got)
    assert qp.report.action_rel_l2 == pytest.approx(float((o - r).norm() / r.norm()), abs=2e-6)
    assert 25 < qp.report.action_sqnr_db < 80


def test_pytree_output_program_saves_and_loads_with_the_same_structure(kv, tmp_path):
    net, x, qp = kv
    path = qp.save(tmp_path / "kv.pt2")
    loaded = qvla_compiler.load(path).module()
    with torch.no_grad():
        want, got = qp.module()(x), loaded(x)
    assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(want)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_output_fidelity_over_leaves_and_structure_mismatch():
    ref = {"a": torch.ones(3), "b": (torch.zeros(2), 7)}
    out = {"a": torch.ones(3), "b": (torch.tensor([0.0, 3.0]), 7)}
    rel, sqnr = output_fidelity(ref, out)
    assert rel == pytest.approx(3 / 3 ** 0.5) and sqnr == pytest.approx(20 * torch.log10(torch.tensor(3 ** 0.5 / 3)))
    assert output_fidelity(ref, ref) == (0.0, float("inf"))
    with pytest.raises(qvla_compiler.errors.ShapeError, match="output structure"):
        output_fidelity(ref, (torch.ones(3),))
