"""fold_computed_weights: weights made from parameters become buffers; input-dependent ones stay, reported float."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvla_compiler
from qvla_compiler import pipeline
from qvla_compiler.export import capture_module
from qvla_compiler.passes.fold_computed_weights import fold_computed_weights


class AttentionPool(nn.Module):
    """SigLIP's pooling head: a learned probe attends over the tokens through nn.MultiheadAttention, whose
    q and k/v projections are F.linear on slices of in_proj_weight / in_proj_bias."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        out, _ = self.attn(self.probe.expand(x.shape[0], -1, -1), x, x)
        return self.mlp(out)


class TiedScaled(nn.Module):
    """A tied, transposed and scaled weight, used twice (as an unrolled sampler would)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return F.linear(F.linear(x, self.emb.t() * 0.5), self.emb.t() * 0.5)


class InputWeight(nn.Module):
    """A hypernetwork-style weight: it depends on the input, so it can be neither folded nor quantized."""

    def __init__(self):
        super().__init__()
        self.w, self.out = nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(F.linear(x, self.w * x.mean()))


def _ops(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _captured(net, x):
    return capture_module(net.eval(), (x,), canonical=False)["forward"]


def test_multihead_attention_slices_become_buffers():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = _captured(AttentionPool(), x)
    before = gm(x)
    assert _ops(gm)["aten.split_with_sizes.default"] == 2
    fold_computed_weights(gm)
    assert _ops(gm)["aten.split_with_sizes.default"] == 0 and _ops(gm)["aten.linear.default"] == 4
    linears = [n for n in gm.graph.nodes if str(n.target) == "aten.linear.default"]
    assert all(n.args[1].op == "get_attr" and n.args[2].op == "get_attr" for n in linears)
    assert [n.args[1].target for n in linears[:2]] == ["attn.in_proj_0.weight", "attn.in_proj_1.weight"]
    assert [n.args[2].target for n in linears[:2]] == ["attn.in_proj_0.bias", "attn.in_proj_1.bias"]
    assert not hasattr(gm.attn, "in_proj_weight") and not hasattr(gm.attn, "in_proj_bias")
    w = dict(gm.named_buffers())["attn.in_proj_1.weight"]
    assert w.untyped_storage().data_ptr() != gm.attn.in_proj_0.weight.untyped_storage().data_ptr()
    gm.graph.lint()
    torch.testing.assert_close(gm(x), before, rtol=0, atol=1e-6)  # same weights; GEMM rounding may differ


def test_identical_computations_share_one_buffer():
    net, x = TiedScaled(), torch.randn(3, 16)
    gm = _captured(net, x)
    before = gm(x)
    fold_computed_weights(gm)
    linears = [n for n in gm.graph.nodes if str(n.target) == "aten.linear.default"]
    assert linears[0].args[1] is linears[1].args[1] and linears[0].args[1].target == "emb_0.weight"
    assert set(_ops(gm)) == {"aten.linear.default"} and not hasattr(gm, "emb")
    assert torch.equal(gm.emb_0.weight, net.emb.detach().t() * 0.5)
    torch.testing.assert_close(gm(x), before, rtol=0, atol=1e-6)


class FactoryWeight(nn.Module):
    """A weight made in forward by factories alone (no parameter read): it used to crash naming its buffer."""

    def forward(self, x):
        return F.linear(x, torch.eye(8) * 2.0)


def test_a_weight_made_by_factories_alone_folds_into_a_buffer():
    x = torch.randn(3, 8)
    gm = fold_computed_weights(_captured(FactoryWeight(), x))
    (linear,) = [n for n in gm.graph.nodes if str(n.target) == "aten.linear.default"]
    assert linear.args[1].target == "folded_0.weight" and torch.equal(gm.folded_0.weight, torch.eye(8) * 2.0)
    assert torch.equal(gm(x), 2.0 * x)


def test_input_dependent_and_plain_weights_are_left_alone():
    x = torch.randn(3, 8)
    gm = _captured(InputWeight(), x)
    code = gm.code
    fold_computed_weights(gm)
    assert gm.code == code  # Expected = Before


def test_input_dependent_weight_is_reported_float_with_a_reason_not_a_crash():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    qp = qvla_compiler.quantize(InputWeight().eval(), (x,), [(x,)], recipe="w8a8", layout="all", progress=False)
    rows = {r.module_path: r for r in qp.report.linears}
    assert rows["out"].bits == "W8A8" and rows["out"].reason is None
    (computed,) = [r for r in qp.report.linears if r.module_path != "out"]
    assert computed.bits == "float" and "computed from graph inputs" in computed.reason
    assert any("kept float" in w for w in qp.report.summary()["warnings"])
    assert '"reason": "its weight is computed from graph inputs' in qp.report.to_json()


def test_multihead_attention_pool_quantizes_end_to_end():
    torch.manual_seed(0)
    net, x = AttentionPool().eval(), torch.randn(2, 5, 16)
    qp = qvla_compiler.quantize(net, (x,), [(torch.randn(2, 5, 16),)], recipe="w8a8", layout="all",
                                progress=False)
    assert qp.report.int_linears == 4 and qp.report.float_linears == 0
    assert {r.module_path for r in qp.report.linears} == {"attn.in_proj_0", "attn.in_proj_1", "attn.out_proj",
                                                          "mlp"}
    assert qp.report.action_sqnr_db > 25 and not qp.report.warnings


@pytest.mark.parametrize("skip, released", [((), True), (("attn.in_proj_1",), False)])
def test_a_consuming_compile_releases_a_parameter_once_every_copy_folded_from_it_is_integer(skip, released):
    """in_proj_weight is read only through its two folded slices (q rows, k/v rows): released with the last of
    them, and kept when one slice stays float (the float program reads that copy, the policy its parameter)."""
    from policy_fixtures import released_names
    from qvla_compiler.recipes import resolve_recipe

    torch.manual_seed(0)
    net, x = AttentionPool().eval(), torch.randn(2, 5, 16)
    recipe = resolve_recipe("w8a8", "all").with_(skip=skip)
    qp = qvla_compiler.quantize(net, (x,), [(torch.randn(2, 5, 16),)], recipe=recipe, progress=False, consume=True)
    assert ("attn.in_proj_weight" in released_names(net)) is released
    assert "mlp.weight" in released_names(net)
    assert qp.module(compiled=False)(x).isfinite().all()
