"""fold_attention_scales is exact: folded α/β == an explicit `query * α` / `out * β` multiply, with no extra op.

Both attention forms (explicit matmul/softmax and SDPA), with and without a per-head q-norm (plain and Gemma-style
1 + w), GQA, biases, q_proj / o_proj float and integer (lowered to qvla:: ops).
"""
import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from qvla_compiler.export import capture_module
from qvla_compiler.meta import QuantSpec, Role, update
from qvla_compiler.lowering import lower_linears
from qvla_compiler.models.common import (RMSNorm, apply_rope, eager_attention, merge_heads, rope_cos_sin,
                                         sdpa_attention, split_heads)
from qvla_compiler.passes import (assign_regions, classify_linears, insert_observers, quantize_linears,
                                  remove_observers)
from qvla_compiler.passes._attention_sites import attention_sites
from qvla_compiler.passes.check_schedule import compute_schedule
from qvla_compiler.passes.fold_attention_scales import alpha_target, fold_attention_scales

WIDTH, HEADS, KV_HEADS, HD, T = 32, 4, 2, 8, 6


class AttnToy(nn.Module):
    """x + o_proj(attention(RoPE(qnorm(q_proj x)), RoPE(k_proj x), v_proj x)), GQA 4 → 2, key padding mask."""

    def __init__(self, sdpa: bool, qnorm: str | None):
        super().__init__()
        self.sdpa = sdpa
        self.q_proj = nn.Linear(WIDTH, HEADS * HD)
        self.k_proj = nn.Linear(WIDTH, KV_HEADS * HD)
        self.v_proj = nn.Linear(WIDTH, KV_HEADS * HD)
        self.o_proj = nn.Linear(HEADS * HD, WIDTH)
        self.q_norm = {None: None, "rms": RMSNorm(HD), "gemma": RMSNorm(HD, unit_offset=True),
                       "fused": nn.RMSNorm(HD)}[qnorm]
        if self.q_norm is not None:
            nn.init.normal_(self.q_norm.weight, 1.0 if qnorm != "gemma" else 0.0, 0.2)

    def forward(self, x, mask):
        cos, sin = rope_cos_sin(torch.arange(x.shape[1])[None].expand(x.shape[0], -1), HD, 10000.0)
        q = split_heads(self.q_proj(x), HEADS)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        k = apply_rope(split_heads(self.k_proj(x), KV_HEADS), cos, sin).repeat_interleave(HEADS // KV_HEADS, 1)
        v = split_heads(self.v_proj(x), KV_HEADS).repeat_interleave(HEADS // KV_HEADS, 1)
        attend = sdpa_attention if self.sdpa else eager_attention
        return x + self.o_proj(merge_heads(attend(q, k, v, mask[:, None, None, :])))


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, -2:] = False
    return torch.randn(3, T, WIDTH, generator=gen), mask


def _graph(sdpa, qnorm, integer=()):
    """Captured, annotated toy graph; linears whose role is in `integer` are quantized W8A8 and lowered."""
    torch.manual_seed(0)
    gm = capture_module(AttnToy(sdpa, qnorm).eval(), _inputs())["forward"]
    classify_linears(gm)
    assign_regions(gm)
    if integer:
        for node in gm.graph.nodes:
            info = node.meta.get("qvla")
            if info is not None and info.role in integer:
                update(node, spec=QuantSpec(8, 8))
        insert_observers(gm)
        gm(*_inputs(1))
        quantize_linears(gm)
        remove_observers(gm)
        lower_linears(gm)
    return gm


def _with_explicit_multiply(gm: fx.GraphModule, alpha: torch.Tensor, beta: float) -> fx.GraphModule:
    """The unfolded reference: query = query * α.view(1, H, 1, 1) before the core, o_proj output * β."""
    ref = copy.deepcopy(gm)
    site = attention_sites(ref)[0]
    ref.register_buffer("ref_alpha", alpha.reshape(1, -1, 1, 1).float())
    core_user = site.sdpa_node if site.is_sdpa else site.core.q.users.keys() & {
        n for n in ref.graph.nodes if n.target is torch.ops.aten.matmul.default}
    core_user = core_user if isinstance(core_user, fx.Node) else next(iter(core_user))
    with ref.graph.inserting_before(core_user):
        a = ref.graph.get_attr("ref_alpha")
        scaled = ref.graph.call_function(torch.ops.aten.mul.Tensor, (site.core.q, a))
    core_user.replace_input_with(site.core.q, scaled)
    o = site.o_linears[0]
    with ref.graph.inserting_after(o):
        out = ref.graph.call_function(torch.ops.aten.mul.Tensor, (o, beta))
    o.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    ref.recompile()
    return ref


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


FORMS = [pytest.param(s, id="sdpa" if s else "explicit") for s in (False, True)]


CASES = [(None, ()), (None, (Role.ATTN_Q,)), (None, (Role.ATTN_O,)), (None, (Role.ATTN_Q, Role.ATTN_O)),
         ("rms", ()), ("rms", (Role.ATTN_Q,)), ("gemma", ()), ("gemma", (Role.ATTN_Q,))]


@pytest.mark.parametrize("sdpa", FORMS)
@pytest.mark.parametrize("qnorm,integer", CASES,
                         ids=[f"{q or 'nonorm'}-{'+'.join(r.value for r in i) or 'float'}" for q, i in CASES])
def test_fold_equals_explicit_multiply(sdpa, qnorm, integer):
    gm = _graph(sdpa, qnorm, integer)
    alpha, beta = torch.tensor([1.25, 0.8, 1.0, 1.1]), 1.3
    ref = _with_explicit_multiply(gm, alpha, beta)
    code, schedule = gm.code, compute_schedule(gm)
    target = alpha_target(gm, attention_sites(gm)[0])
    assert target.kind == ("norm" if qnorm else "linear")
    x = _inputs(2)
    before = gm(*x)[0] if isinstance(gm(*x), tuple) else gm(*x)
    fold_attention_scales(gm, {0: alpha.tolist()}, {0: beta})
    assert gm.code == code and compute_schedule(gm) == schedule  # no op added, removed or moved
    got, want = gm(*x), ref(*x)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert _rel(got, want) < 1e-6
    assert _rel(got, before) > 1e-3  # the fold did something
    for n in gm.graph.nodes:  # integer linears whose dequant scale took α or β record it
        if str(n.target).startswith("qvla.int8_linear") and not (qnorm and n.meta["qvla"].role is Role.ATTN_Q):
            assert n.meta["qvla"].out_scale is not None


def test_fold_never_mutates_the_users_module():
    torch.manual_seed(0)
    module = AttnToy(False, None).eval()
    w_q, w_o = module.q_proj.weight.detach().clone(), module.o_proj.bias.detach().clone()
    gm = capture_module(module, _inputs())["forward"]
    classify_linears(gm)
    fold_attention_scales(gm, {0: [1.2, 1.0, 0.9, 1.0]}, {0: 1.3})
    assert torch.equal(module.q_proj.weight, w_q) and torch.equal(module.o_proj.bias, w_o)


def test_fused_norm_is_refused_with_a_reason():
    gm = _graph(False, "fused")
    reason = alpha_target(gm, attention_sites(gm)[0])
    assert isinstance(reason, str) and "fused norm" in reason
    with pytest.raises(ValueError, match="fused norm"):
        fold_attention_scales(gm, {0: [1.2, 1.0, 1.0, 1.0]}, {})
    fold_attention_scales(gm, {0: [1.0] * HEADS}, {0: 1.2})  # α = 1 and β still fold fine


def test_neutral_fold_is_identity():
    gm = _graph(True, None)
    x = _inputs(2)
    before = gm(*x)
    fold_attention_scales(gm, {0: [1.0] * HEADS}, {0: 1.0})
    assert torch.equal(gm(*x), before)


def test_getitem_free_sdpa_site_found():
    gm = _graph(True, None)
    site = attention_sites(gm)[0]
    assert site.is_sdpa and site.heads == HEADS and site.head_dim == HD
    assert all(n.target is not operator.getitem for n in site.q_linears)
