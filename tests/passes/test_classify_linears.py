"""Structural classification and dataflow regions agree with what the module names say, on every policy."""
import os

import pytest
import torch

from qvla_compiler.export import capture_module, capture_policy
from qvla_compiler.meta import Region, Role
from qvla_compiler.models import build_policy
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes import assign_regions, classify_linears
from toy_models import TOY_ROLES, ToyPolicyNet
import zoo_models as zm

# Ground truth from names (the passes themselves never read names).
_ROLE_BY_NAME = {"q_proj": Role.ATTN_Q, "to_q": Role.ATTN_Q, "k_proj": Role.ATTN_K, "to_k": Role.ATTN_K,
                 "v_proj": Role.ATTN_V, "to_v": Role.ATTN_V, "o_proj": Role.ATTN_O, "out_proj": Role.ATTN_O,
                 "to_out.0": Role.ATTN_O, "gate_proj": Role.MLP, "up_proj": Role.MLP, "down_proj": Role.MLP,
                 "fc1": Role.MLP, "fc2": Role.MLP, "ff.net.0.proj": Role.MLP, "ff.net.2": Role.MLP}
_VISION = ("vision.", "multi_modal_projector", "mlp1")
_HEAD = ("action_", "time_mlp_", "action_head.")


def role_from_name(path: str) -> Role:
    return next((r for suffix, r in _ROLE_BY_NAME.items() if ("." + path).endswith("." + suffix)), Role.OTHER)


def region_from_name(path: str) -> Region:
    if path.startswith(_VISION):
        return Region.VISION
    return Region.ACTION_HEAD if path.startswith(_HEAD) else Region.BACKBONE


def _captured(name):
    policy = build_policy(name)
    obs = policy.example_inputs()
    return capture_policy(policy, obs, policy.example_noise(2))


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny",
                                  pytest.param("pi05-small", marks=pytest.mark.slow),
                                  pytest.param("groot-small", marks=pytest.mark.slow)])
def test_structure_agrees_with_names_on_reference_policies(name):
    _assert_structure_matches_names(_captured(name), build_policy(name))


def _assert_structure_matches_names(graphs, policy):
    checked = 0
    for gm in graphs.values():
        classify_linears(gm)
        assign_regions(gm)
        for node in g.linear_nodes(gm):
            info = node.meta["qvla"]
            assert (info.role, info.region) == (role_from_name(info.module_path), region_from_name(info.module_path)), info
            checked += 1
    assert checked == sum(isinstance(m, torch.nn.Linear) for m in policy.modules())


@pytest.mark.parametrize("kw", [{}, {"fused": True}, {"qk_norm": True}])
def test_toy_attention_forms(kw):
    gm = capture_module(ToyPolicyNet(**kw).eval(), (torch.randn(2, 6, 8),))["forward"]
    classify_linears(gm)
    infos = [n.meta["qvla"] for n in g.linear_nodes(gm)]
    assert [i.role.value for i in infos] == [TOY_ROLES[i.module_path.split(".")[-1]] for i in infos]
    q = next(i for i in infos if i.role in (Role.ATTN_Q, Role.ATTN_QKV))
    assert q.head_dim == 8 and q.block == 0
    assert {i.block for i in infos if i.role is Role.MLP} == {0, 1}


def test_mlp_without_residual_is_other():
    """linear → silu → linear feeding nothing residual (a timestep MLP) is not an MLP block."""
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4))
    gm = capture_module(mlp.eval(), (torch.randn(2, 4),))["forward"]
    classify_linears(gm)
    assert {n.meta["qvla"].role for n in g.linear_nodes(gm)} == {Role.OTHER}


def test_role_and_region_overrides_by_module_path():
    gm = capture_module(ToyPolicyNet().eval(), (torch.randn(2, 6, 8),))["forward"]
    classify_linears(gm, role_overrides=(("embed_in", "mlp"),))
    assign_regions(gm, region_overrides=(("blocks.1", "action_head"),))
    by_path = {n.meta["qvla"].module_path: n.meta["qvla"] for n in g.linear_nodes(gm)}
    assert by_path["embed_in"].role is Role.MLP and by_path["embed_out"].role is Role.OTHER
    assert by_path["blocks.1.q_proj"].region is Region.ACTION_HEAD
    assert by_path["blocks.0.q_proj"].region is Region.BACKBONE


def test_cross_attention_kv_follow_their_query():
    """GR00T's even DiT blocks project backbone features into K/V: structurally backbone, but head attention."""
    graphs = _captured("groot-tiny")
    gm = graphs["denoise"]
    classify_linears(gm)
    assign_regions(gm)
    kv = [n.meta["qvla"] for n in g.linear_nodes(gm) if n.meta["qvla"].module_path.endswith(
        ("transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v"))]
    assert len(kv) == 2 and all(i.region is Region.ACTION_HEAD for i in kv)


def _blocks(module, args, input_roles=None):
    gm = capture_module(module.eval(), args, input_roles)["forward"]
    classify_linears(gm)
    return {n.meta["qvla"].module_path: n.meta["qvla"].block for n in g.linear_nodes(gm)}


def test_one_query_serving_two_cores_is_one_attention_block():
    """Wan I2V / IP-Adapter (zoo: shared_query_head, whose roles and regions test_zoo checks)."""
    blocks = _blocks(zm.SharedQueryHead(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 4, 32)))
    assert len({blocks[p] for p in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "to_out")}) == 1


class JointAttentionOverPrefixKV(torch.nn.Module):
    """One graph with a prefix attention and an action attention whose keys/values are the prefix's K/V and its own
    (π0's joint attention, EO1 with prefix and denoise step in one graph). The prefix's k/v projections took the
    later, action block and region (so `quantvla` kept them float while their q/o were integer)."""

    def __init__(self, d=32):
        super().__init__()
        self.pre = torch.nn.ModuleDict({n: torch.nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.act = torch.nn.ModuleDict({n: torch.nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.act_in = torch.nn.Linear(8, d)

    def forward(self, prefix_emb, x_t):
        heads = lambda z: z.unflatten(-1, (4, -1)).transpose(1, 2)  # noqa: E731
        merge = lambda z: z.transpose(1, 2).flatten(2)  # noqa: E731
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kp, vp = heads(self.pre["k_proj"](prefix_emb)), heads(self.pre["v_proj"](prefix_emb))
        pre = prefix_emb + self.pre["o_proj"](merge(sdpa(heads(self.pre["q_proj"](prefix_emb)), kp, vp)))
        a = self.act_in(x_t)
        k, v = torch.cat([kp, heads(self.act["k_proj"](a))], 2), torch.cat([vp, heads(self.act["v_proj"](a))], 2)
        return pre, a + self.act["o_proj"](merge(sdpa(heads(self.act["q_proj"](a)), k, v)))


def test_prefix_kv_read_by_a_later_attention_stays_in_the_prefix_block():
    gm = capture_module(JointAttentionOverPrefixKV().eval(), (torch.randn(2, 10, 32), torch.randn(2, 6, 8)),
                        {"prefix_emb": "text"})["forward"]
    assign_regions(classify_linears(gm))
    got = {n.meta["qvla"].module_path: (n.meta["qvla"].block, n.meta["qvla"].region) for n in g.linear_nodes(gm)}
    assert {got[f"pre.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")} == {(0, Region.BACKBONE)}
    assert {got[f"act.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")} == {(1, Region.ACTION_HEAD)}


class ExpertsPickedByWhere(torch.nn.Module):
    """Hard-routed experts, each token's output picked by torch.where (an export-friendly MoE, Wall-X's modality
    experts): the down projections reach the residual add through `where`; they were `other`, float in quantvla."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.experts = torch.nn.ModuleList(torch.nn.ModuleDict({"up": torch.nn.Linear(d, 64),
                                                                "down": torch.nn.Linear(64, d)}) for _ in range(2))

    def forward(self, x, token_types):
        h, out = self.norm(x), torch.zeros_like(x)
        for i, e in enumerate(self.experts):
            out = torch.where((token_types == i)[..., None], e["down"](torch.relu(e["up"](h))), out)
        return x + out


def test_experts_picked_by_where_are_mlp():
    gm = capture_module(ExpertsPickedByWhere().eval(), (torch.randn(2, 8, 32), torch.randint(0, 2, (2, 8))),
                        {"token_types": "input"})["forward"]
    classify_linears(gm)
    assert {n.meta["qvla"].role for n in g.linear_nodes(gm)} == {Role.MLP}


class NormedHiddenMLP(torch.nn.Module):
    """timm's Mlp(norm_layer=nn.LayerNorm) and EVA-02's SwiGLU with its ffn LayerNorm (sub-LN): a norm between the
    up and the down projection. Both were `other`, float under quantvla."""

    def __init__(self, d=32, h=64):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.RMSNorm(d)
        self.fc1, self.hidden_norm, self.fc2 = torch.nn.Linear(d, h), torch.nn.LayerNorm(h), torch.nn.Linear(h, d)
        self.w1, self.w2 = torch.nn.Linear(d, h), torch.nn.Linear(d, h)
        self.ffn_ln, self.w3 = torch.nn.RMSNorm(h), torch.nn.Linear(h, d)

    def forward(self, x):
        x = x + self.fc2(self.hidden_norm(torch.nn.functional.gelu(self.fc1(self.norm1(x)))))
        h = self.norm2(x)
        return x + self.w3(self.ffn_ln(torch.nn.functional.silu(self.w1(h)) * self.w2(h)))


def test_an_mlp_with_a_norm_before_its_down_projection_is_an_mlp():
    gm = capture_module(NormedHiddenMLP().eval(), (torch.randn(2, 5, 32),))["forward"]
    classify_linears(gm)
    got = {n.meta["qvla"].module_path: (n.meta["qvla"].role, n.meta["qvla"].mlp_part, n.meta["qvla"].block)
           for n in g.linear_nodes(gm)}
    assert got == {"fc1": (Role.MLP, "up", 0), "fc2": (Role.MLP, "down", 0), "w1": (Role.MLP, "up", 1),
                   "w2": (Role.MLP, "up", 1), "w3": (Role.MLP, "down", 1)}


def test_an_attention_output_normalised_before_its_projection_is_attn_o():
    """Sub-LN (Magneto, BitNet; timm's `attn.norm` before `proj`): the norm hid the output projection."""
    class SubLN(torch.nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.qkv, self.norm, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

        def forward(self, x):
            q, k, v = (z.unflatten(-1, (4, 8)).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return x + self.proj(self.norm(a))

    gm = capture_module(SubLN().eval(), (torch.randn(2, 5, 32),))["forward"]
    classify_linears(gm)
    assert [(n.meta["qvla"].role, n.meta["qvla"].block) for n in g.linear_nodes(gm)] == [(Role.ATTN_QKV, 0),
                                                                                         (Role.ATTN_O, 0)]


def test_an_output_projection_shared_with_an_mlp_is_in_no_attention_block():
    """Flux's single-stream block (zoo: single_stream_block): OHB's β must not scale the MLP half of proj_out."""
    blocks = _blocks(zm.SingleStreamBlock(), (torch.randn(2, 5, 32), torch.randn(2, 32)), {"t_emb": "time"})
    assert blocks["proj_out"] == -1 and blocks["to_q"] >= 0 and blocks["proj_mlp"] >= 0


class AttentionOntoAConcatenatedStream(torch.nn.Module):
    """No o_proj: the attention output is added straight onto a stream made by `cat` (the sum-of-attention-outputs
    check once followed cat's list argument as if it were a tensor and crashed)."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, a, b):
        x = torch.cat([a, b], dim=1)
        x = x + torch.nn.functional.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None],
                                                                  self.v(x)[:, None])[:, 0]
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_an_attention_output_summed_onto_a_concatenation():
    gm = capture_module(AttentionOntoAConcatenatedStream().eval(), (torch.randn(2, 3, 16), torch.randn(2, 4, 16)))
    classify_linears(gm["forward"])
    roles = {n.meta["qvla"].module_path: n.meta["qvla"].role.value for n in g.linear_nodes(gm["forward"])}
    assert roles == {"q": "attn_q", "k": "attn_k", "v": "attn_v", "up": "mlp", "down": "mlp"}


@pytest.mark.skipif(os.environ.get("QVLA_FULL") != "1", reason="full presets: ~3 min each on the meta device; "
                    "set QVLA_FULL=1 to run")
@pytest.mark.parametrize("name", ["pi05-full", "groot-full"])
def test_structure_agrees_with_names_on_full_presets(name):
    """Full dimensions, traced on the meta device (no 15 GB of weights needed: export only needs shapes)."""
    from qvla_compiler.models import GrootPolicy, Pi05Policy, get_config

    with torch.device("meta"):
        policy = (Pi05Policy if name.startswith("pi05") else GrootPolicy)(get_config(name)).eval()
        obs, noise = policy.example_inputs(2), policy.example_noise(2)
    _assert_structure_matches_names(capture_policy(policy, obs, noise), policy)
