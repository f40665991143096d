"""The architecture zoo: structure (normalize_graph → classify_linears → assign_regions) agrees with module names on
every linear of every zoo model, and normalisation changes no value."""
import copy
import dataclasses
import importlib
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from qvla_compiler.errors import ArtifactError, RecipeError, ShapeError
from qvla_compiler.export import INPUTS_KEY, FixedBatchWarning, InputRoleError, capture_module
from qvla_compiler.meta import Region, Role
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes import (apply_layout, assign_regions, canonicalize_linears, classify_linears,
                                  fold_computed_weights, inline_subgraphs)
from qvla_compiler.passes.normalize_graph import normalize_graph
from qvla_compiler.recipes import resolve_recipe
from qvla_compiler.quant.released import ConsumedWeightError
from policy_fixtures import released_names
import qvla_compiler
import zoo_models as zm
from zoo_models import B, H, T, W


def _x(width=W):
    return torch.randn(B, T, width)


def _padded(length: int) -> torch.Tensor:
    """A key mask [B, length] whose last sample has its two last keys padded out."""
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[-1, -2:] = False
    return mask


_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o", "out_proj": "attn_o"}
_SWIGLU = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_DIFFUSERS = {"to_q": "attn_q", "to_k": "attn_k", "to_v": "attn_v", "to_out": "attn_o", "ff.proj": "mlp",
              "ff.out": "mlp"}


@dataclasses.dataclass(frozen=True)
class ZooCase:
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    roles: dict  # module-name suffix → role; names not listed are "other"
    head: tuple = ()  # module-name prefixes in the action-head region; every other linear is backbone
    input_roles: dict | None = None  # passed to capture_module (None: inferred from argument names)


ZOO = {
    "inplace_attention": ZooCase(zm.InplaceAttention, lambda: (_x(), torch.rand(B, T, T) > 0.3),
                                 {**_ATTN, **_SWIGLU}),
    "clone_residual": ZooCase(zm.CloneResidual, lambda: (_x(),), _SWIGLU),
    "parallel_residual": ZooCase(zm.ParallelResidual, lambda: (_x(),),
                                 {**_ATTN, "fc_in": "mlp", "fc_out": "mlp"}),
    "einsum_attention": ZooCase(zm.EinsumAttention, lambda: (_x(), torch.randn(B, H, T, T)),
                                {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_o", "w1": "mlp",
                                 "w2": "mlp"}),
    "baddbmm_attention": ZooCase(zm.BaddbmmAttention, lambda: (_x(), torch.randn(B * H, T, T)),
                                 {"query": "attn_q", "key": "attn_k", "value": "attn_v", "dense": "attn_o"}),
    "grouped_query": ZooCase(zm.GroupedQuery, lambda: (_x(),), {**_ATTN, **_SWIGLU}),
    "fused_qkv": ZooCase(zm.FusedQKV, lambda: (_x(),),
                         {"qkv": "attn_qkv", "proj": "attn_o", "fc1": "mlp", "fc2": "mlp"}),
    "qk_norm_rope": ZooCase(zm.QKNormRope, lambda: (_x(),), {**_ATTN, **_SWIGLU}),
    "cross_attention": ZooCase(zm.CrossAttention, lambda: (_x(), torch.randn(B, 5, 24)), _DIFFUSERS),
    "adaln_dit": ZooCase(zm.AdaLNBlock, lambda: (_x(), torch.randn(B, 16)),
                         {"qkv": "attn_qkv", "proj": "attn_o", "mlp.0": "mlp", "mlp.2": "mlp"},
                         head=("",), input_roles={"x": "action", "t_freq": "time"}),
    "adarms_expert": ZooCase(zm.AdaRMSBlock, lambda: (_x(), torch.randn(B, W)), {**_ATTN, **_SWIGLU},
                             head=("",), input_roles={"x": "action", "cond": "time"}),
    "glu_variants": ZooCase(zm.GLUVariants, lambda: (_x(),),
                            {n: "mlp" for n in ("w1", "w2", "w3", "wi_0", "wi_1", "wo", "c_fc", "c_proj")}),
    "routed_experts": ZooCase(zm.RoutedExperts, lambda: (_x(),), _SWIGLU),
    "tied_weights": ZooCase(zm.TiedWeights, lambda: (torch.randint(0, 50, (B, T)),), {**_ATTN, **_SWIGLU}),
    "torch_mha": ZooCase(zm.TorchMHA, lambda: (_x(),),
                         {"in_proj_weight": "attn_qkv", "out_proj": "attn_o", "mlp.0": "mlp", "mlp.2": "mlp"}),
    "gpt2_conv1d": ZooCase(zm.GPT2Block, lambda: (_x(),),
                           {"attn.c_attn.folded_0": "attn_qkv", "attn.c_proj.folded_0": "attn_o",
                            "mlp.c_fc.folded_0": "mlp", "mlp.c_proj.folded_0": "mlp"}),
    "dit_step": ZooCase(zm.DiTStep, lambda: (torch.randn(B, T, 7), torch.rand(B), torch.randn(B, 5, 48)),
                        _DIFFUSERS, head=("",)),  # input roles inferred: x_t → action, timestep → time
    "state_value_head": ZooCase(zm.StateValueHead, lambda: (_x(), torch.randn(B, 7)),
                                {"fc_in": "mlp", "fc_out": "mlp"}),  # the state encoder: "other", as GR00T's
    # the fused k/v einsum: attn_kv (attention like K and V; ATM folds only into q)
    "einsum_projections": ZooCase(zm.EinsumProjections, lambda: (_x(),),
                                  {"q_einsum_0": "attn_q", "kv_einsum_0": "attn_kv", "attn_vec_einsum_0": "attn_o",
                                   "gating_einsum_0": "mlp", "linear_0": "mlp"}),
    "autocast_block": ZooCase(zm.AutocastBlock, lambda: (_x(),), {**_ATTN, **_SWIGLU}),
    "stacked_experts": ZooCase(zm.StackedExperts, lambda: (_x(),),
                               {f"{p}_proj_{e}": "mlp" for p in ("gate_up", "down") for e in range(4)}),
    "flex_attention_expert": ZooCase(zm.FlexAttentionExpert, lambda: (_x(), torch.randn(B, W)), {**_ATTN, **_SWIGLU},
                                     head=("",), input_roles={"x": "action", "cond": "time"}),
    "fused_kv_cross_attention": ZooCase(zm.FusedKVCrossAttention, lambda: (_x(), torch.randn(B, 7, W)),
                                        {"to_q": "attn_q", "to_kv": "attn_kv", "to_out": "attn_o",
                                         "mha.in_proj_0": "attn_q", "mha.in_proj_1": "attn_kv",
                                         "mha.out_proj": "attn_o"}),
    "shared_query_head": ZooCase(zm.SharedQueryHead, lambda: (_x(), torch.randn(B, 7, W), torch.randn(B, 4, W)),
                                 {"to_q": "attn_q", "to_k": "attn_k", "to_v": "attn_v", "add_k_proj": "attn_k",
                                  "add_v_proj": "attn_v", "to_out": "attn_o", **_SWIGLU}, head=("",),
                                 input_roles={"text": "prefix", "image": "prefix"}),
    "masked_cross_attention": ZooCase(zm.MaskedCrossAttention, lambda: (_x(), torch.randn(B, 7, W), _padded(7)),
                                      {**_ATTN, **_SWIGLU}, head=("",),
                                      input_roles={"prefix": "prefix", "prefix_mask": "prefix"}),
    "single_stream_block": ZooCase(zm.SingleStreamBlock, lambda: (_x(), torch.randn(B, W)),
                                   {"to_q": "attn_q", "to_k": "attn_k", "to_v": "attn_v", "proj_mlp": "mlp",
                                    "proj_out": "attn_o"}, head=("",), input_roles={"t_emb": "time"}),
}


def truth_name(node) -> str:
    """The linear's module path from provenance: the innermost module running; for a linear computed inside a
    module that is not an nn.Linear (nn.MultiheadAttention's in_proj / out_proj), the weight's own name."""
    path, cls = list(node.meta["nn_module_stack"].values())[-1]
    return path if cls.endswith(".Linear") else node.args[1].target.removesuffix(".weight")


def truth(case, name: str) -> tuple[Role, Region]:
    hits = [suffix for suffix in case.roles if ("." + name).endswith("." + suffix)]
    role = Role(case.roles[max(hits, key=len)]) if hits else Role.OTHER
    return role, Region.ACTION_HEAD if name.startswith(case.head) and case.head else Region.BACKBONE


def analysed(case):
    torch.manual_seed(0)
    args = case.inputs()
    gm = capture_module(case.build().eval(), args, case.input_roles, canonical=False)["forward"]
    with torch.no_grad():
        captured = gm(*args)
        normalize_graph(inline_subgraphs(gm))
        assert torch.equal(gm(*args), captured)  # bit-identical: in-place ops re-spelled, autocast casts made explicit
    fold_computed_weights(canonicalize_linears(gm))
    classify_linears(gm)
    assign_regions(gm)
    return gm


@pytest.mark.parametrize("name", list(ZOO))
def test_structure_agrees_with_names_on_the_zoo(name):
    case = ZOO[name]
    gm = analysed(case)
    rows = [(truth_name(n), n.meta["qvla"]) for n in g.linear_nodes(gm)]
    wrong = [(path, info.role.value, info.region.value, *(t.value for t in truth(case, path)))
             for path, info in rows if (info.role, info.region) != truth(case, path)]
    assert rows and not wrong, f"{len(wrong)}/{len(rows)} linears disagree (path, got role/region, want):\n{wrong}"
    assert any(info.role is not Role.OTHER for _, info in rows)


def test_inplace_attention_is_functional_after_normalisation():
    """SmolVLA writes `scores *= scale` and `h += residual`: torch.export keeps them as mul_ / add_."""
    torch.manual_seed(0)
    case = ZOO["inplace_attention"]
    gm = capture_module(case.build().eval(), case.inputs(), canonical=False)["forward"]
    inplace = [n for n in gm.graph.nodes if n.op == "call_function" and torch.Tag.inplace in n.target.tags]
    assert [str(n.target) for n in inplace] == ["aten.mul_.Tensor", "aten.add_.Tensor", "aten.add_.Tensor"]
    normalize_graph(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(torch.Tag.inplace in getattr(t, "tags", ()) for t in targets)
    assert (targets.count(g.aten.mul.Tensor), targets.count(g.aten.add.Tensor)) == (2, 2)


def test_denoise_step_regions_follow_inferred_input_names():
    """forward(x_t, timestep, encoder_hidden_states): every linear is the action head's, so quantvla leaves its
    attention float and makes its MLPs integer (the documented layout), instead of treating it as backbone."""
    torch.manual_seed(0)
    gm = capture_module(zm.DiTStep().eval(), ZOO["dit_step"].inputs())["forward"]
    assert gm.meta[INPUTS_KEY] == ("action", "time", "prefix")
    normalize_graph(gm)
    classify_linears(gm)
    assign_regions(gm)
    apply_layout(gm, resolve_recipe("w8a8", "quantvla"))
    infos = [n.meta["qvla"] for n in g.linear_nodes(gm)]
    assert {i.region for i in infos} == {Region.ACTION_HEAD}
    integer = {i.role for i in infos if i.is_quantized}
    assert integer == {Role.MLP}


def test_input_roles_by_argument_name_with_pytree_leaves():
    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.kv, self.patch = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, pixel_values, feats, x_t, t):
            ctx = self.kv(feats["k"] + feats["v"]) + self.patch(pixel_values)
            return self.proj(x_t) * t[:, None, None] + ctx

    x = [torch.randn(2, 3, 4) for _ in range(4)]  # distinct tensors: export ties inputs that are one object
    args = (x[0], {"k": x[1], "v": x[2]}, x[3], torch.rand(2))
    gm = capture_module(Step(), args, input_roles={"feats": "backbone"})["forward"]
    assert gm.meta[INPUTS_KEY] == ("image", "prefix", "prefix", "action", "time")
    classify_linears(gm)
    assign_regions(gm)
    regions = {n.meta["qvla"].module_path: n.meta["qvla"].region for n in g.linear_nodes(gm)}
    assert regions == {"proj": Region.ACTION_HEAD, "kv": Region.BACKBONE, "patch": Region.VISION}


@pytest.mark.parametrize("roles, message", [({"x_t": "actions"}, "'actions' is not a role; use one of"),
                                            ({"noise": "action"}, "its arguments are ['x_t', 't']")])
def test_unknown_input_roles_raise_a_named_error(roles, message):
    class Step(torch.nn.Module):
        def forward(self, x_t, t):
            return x_t * t

    with pytest.raises(InputRoleError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        capture_module(Step(), (torch.randn(2), torch.randn(2)), input_roles=roles)
    assert "image" in str(err.value) or "x_t" in str(err.value)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_quantizes_end_to_end(name):
    """Held-out shapes through the whole compiler: no exception; under layout `all` every linear integer (or float
    with its reason) and W8A8 output rel-L2 < 0.05; under `quantvla` exactly the linears whose name-derived
    (region, role) the layout lists are integer."""
    case = ZOO[name]
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    everything = qvla_compiler.quantize(module, args, calib, "w8a8", layout="all", progress=False,
                                        input_roles=case.input_roles)
    kept = [(r.module_path, r.reason) for r in everything.report.linears if r.bits == "float"]
    assert all(reason for _, reason in kept), f"linears silently left float: {kept}"
    assert everything.report.action_rel_l2 < 0.05
    pairs = resolve_recipe("w8a8", "quantvla").integer_pairs()
    want = sum(truth(case, truth_name(n)) [::-1] in pairs for n in g.linear_nodes(analysed(case)))
    layout = qvla_compiler.quantize(module, args, calib, "w8a8", progress=False, input_roles=case.input_roles)
    assert sum(r.bits != "float" for r in layout.report.linears) == want


@pytest.mark.parametrize("name", list(ZOO))
def test_consuming_a_zoo_module_gives_the_same_program_and_releases_only_integer_weights(name):
    case = ZOO[name]
    torch.manual_seed(0)
    kept, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    consumed = copy.deepcopy(kept)
    a = qvla_compiler.quantize(kept, args, calib, "w8a8", layout="all", progress=False, input_roles=case.input_roles)
    b = qvla_compiler.quantize(consumed, args, calib, "w8a8", layout="all", progress=False,
                               input_roles=case.input_roles, consume=True)
    assert a.report.linears == b.report.linears  # every row, its SQNR included (measured before the release)
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(a.module()(*args)), tree_leaves(b.module()(*args))))
    released = released_names(consumed)
    assert not released_names(kept)
    assert released, "an all-integer compile released nothing"
    if name == "tied_weights":  # the LM head's weight is the embedding table, which stays float: never released
        assert "embed_tokens.weight" not in released and "lm_head.weight" not in released
    with pytest.raises(ConsumedWeightError):
        consumed(*args)


@pytest.mark.parametrize("recipe", ["w8a8+duquant", "w8a8+svd-hadamard", "w8a8+smoothquant", "w8a8+awq"])
def test_a_block_applied_twice_gets_one_fitted_transform(recipe, monkeypatch):
    """TiedWeights applies one block twice: each of its weights has two call sites and one integer copy in the plan.
    A transform fitted per call site gave the second site its own rotation but the first site's integers (W8A8
    rel-L2 0.47 with DuQuant); both sites now carry the first site's transform, as exact as the unshared shapes,
    and it is fitted once: the second site's fit was work thrown away."""
    case = ZOO["tied_weights"]
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    plain = qvla_compiler.quantize(module, args, calib, "w8a8", layout="all", progress=False)
    fits = []
    passes = [importlib.import_module(f"qvla_compiler.passes.{name}")
              for name in ("rotate_duquant", "rotate_and_smooth", "smooth_linears")]
    for fitter in ("calibrate_duquant", "calibrate_svd_hadamard", "smoothquant_scales", "awq_search_scales"):
        owner = next(m for m in passes if hasattr(m, fitter))
        fit = getattr(owner, fitter)
        monkeypatch.setattr(owner, fitter, lambda *a, _fit=fit, **k: fits.append(1) or _fit(*a, **k))
    rotated = qvla_compiler.quantize(module, args, calib, recipe, layout="all", progress=False)
    assert rotated.report.action_rel_l2 < 2 * plain.report.action_rel_l2 < 0.02
    gm = rotated.module(compiled=False)
    online = [n for n in gm.graph.nodes if n.op == "call_function" and "qvla.block_rotate" in str(n.target)]
    by_input = {}  # both sites of a group: the same matrices
    for node in online:
        weights = tuple(str(u.args[2].target) for q in node.users for x in q.users for u in x.users
                        if "linear" in str(u.target))
        by_input.setdefault(weights, []).append([getattr(gm, a.target) for a in node.args[1:] if a is not None])
    assert sorted(map(len, by_input.values())) == ([1] + [2] * 4 if "hadamard" in recipe or "duquant" in recipe else [])
    assert len(fits) == len(by_input)  # one fit per distinct input; each call site's own fit made 9
    for first, second in (sites for sites in by_input.values() if len(sites) == 2):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_per_step_scales_on_a_module_without_a_schedule_are_refused_up_front():
    """Per-step tables need the sampler's flow steps; a captured module has none. Calibration used to fall back to
    dynamic scales and apply then refused the plan it had just made (PlanError on DiTStep)."""
    case = ZOO["dit_step"]
    module, args = case.build().eval(), case.inputs()
    with pytest.raises(RecipeError, match="per_step.*schedule"):
        qvla_compiler.quantize(module, args, [args], "w8a8-perstep", progress=False)


@pytest.mark.parametrize("recipe", ["quantvla-w4a8", "omega-w4a4"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_through_the_data_fitted_recipes_saves_and_loads(name, recipe, tmp_path):
    """Every shape under the two recipes whose transforms are fitted on data (DuQuant + ATM/OHB; SVD·Hadamard + GPTQ),
    every linear integer: bounded action error (these shapes give 0.01-0.25 at W4A4, the shared-block bug gave
    0.47-0.55) and the saved program loads bit-identical."""
    case = ZOO[name]
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    qp = qvla_compiler.quantize(module, args, calib, recipe, layout="all", progress=False, input_roles=case.input_roles)
    assert qp.report.action_rel_l2 < 0.35
    if name == "flex_attention_expert":  # torch.export's serializer refuses flex_attention's block mask (torch 2.13)
        with pytest.raises(ArtifactError, match="flex_attention"):
            qp.save(tmp_path / "zoo.pt2")
        assert not list(tmp_path.iterdir())
        return
    loaded = qvla_compiler.load(qp.save(tmp_path / "zoo.pt2")).module(compiled=False)
    want, got = tree_leaves(qp.module(compiled=False)(*args)), tree_leaves(loaded(*args))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_a_module_program_takes_any_batch_saved_and_loaded(tmp_path):
    """A plain module is captured with a dynamic batch, as a policy is: quantized at batch 2, run at batch 3 after a
    save and load (it was fixed at the example's batch: 'Guard failed: x.size()[0] == 2')."""
    case = ZOO["qk_norm_rope"]
    torch.manual_seed(0)
    module, args = case.build().eval(), case.inputs()
    qp = qvla_compiler.quantize(module, args, [case.inputs()], "w8a8", layout="all", progress=False)
    x3 = torch.randn(3, *args[0].shape[1:])
    loaded = qvla_compiler.load(qp.save(tmp_path / "m.pt2")).module(compiled=False)
    assert torch.equal(loaded(x3), qp.module(compiled=False)(x3))
    assert (loaded(x3) - module(x3)).norm() < 0.02 * module(x3).norm()


class BatchAtDimOne(nn.Module):
    """An input whose batch sits at dim 1 (Qwen2.5-VL's mrope position ids, (3, B, S): EO1's denoise step), so the
    batch cannot be dynamic: the program is captured at the example's batch, which was silent."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(W, 64), nn.Linear(64, W)

    def forward(self, x_t, pos):
        return x_t + self.down(torch.relu(self.up(x_t + pos.float().mean(0)[..., None])))


def test_a_module_fixed_at_its_example_batch_says_so(tmp_path):
    args = (_x(), torch.arange(T).expand(3, B, T).contiguous())
    with pytest.warns(FixedBatchWarning, match=rf"batch \({B}\).*takes batch {B} only.*Constraints violated"):
        qp = qvla_compiler.quantize(BatchAtDimOne().eval(), args, [args], "w8a8", layout="all", progress=False,
                                    input_roles={"pos": "input"})
    assert any("takes batch" in w for w in qp.report.warnings)
    other = (torch.randn(B + 1, T, W), torch.arange(T).expand(3, B + 1, T).contiguous())
    loaded = qvla_compiler.load(qp.save(tmp_path / "fixed.pt2")).module(compiled=False)
    for program in (qp.module(compiled=False), loaded):  # a named error, not torch's bare AssertionError
        with pytest.raises(ShapeError, match="Guard failed.*FixedBatchWarning"):
            program(*other)
    assert torch.equal(loaded(*args), qp.module(compiled=False)(*args))


def test_a_batch_1_example_gives_a_batch_1_program_and_says_so():
    case = ZOO["qk_norm_rope"]
    module, x = case.build().eval(), torch.randn(1, T, W)
    with pytest.warns(FixedBatchWarning, match="batch-1 example.*takes batch 1 only"):
        qp = qvla_compiler.quantize(module, (x,), [(x,)], "w8a8", layout="all", progress=False)
    with pytest.raises(ShapeError, match="Guard failed"):
        qp.module(compiled=False)(torch.randn(2, T, W))


class MaskedScatterMerge(nn.Module):
    """Image features written into the text embeddings at placeholder tokens (masked_scatter with a numel check, as
    transformers' VLMs merge them): torch.export bounds the gathered count by the example's batch, so the program
    failed at batch 1 with a bare RuntimeError and no warning."""

    def __init__(self):
        super().__init__()
        self.emb, self.vis, self.lm = nn.Embedding(64, W), nn.Linear(12, W), nn.Linear(W, W)

    def forward(self, input_ids, pixel_values):
        x, f = self.emb(input_ids), self.vis(pixel_values)
        mask = (input_ids == 7).unsqueeze(-1).expand_as(x)
        torch._check(x[mask].numel() == f.numel())
        return self.lm(x.masked_scatter(mask, f))


def test_a_program_that_cannot_run_batch_1_says_so_and_names_the_error():
    def inputs(batch):
        ids = torch.randint(8, 64, (batch, 10))
        ids[:, :4] = 7
        return ids, torch.randn(batch, 4, 12)

    with pytest.warns(FixedBatchWarning, match="fails at batch 1.*Runtime assertion failed"):
        qp = qvla_compiler.quantize(MaskedScatterMerge().eval(), inputs(2), [inputs(2)], "w8a8", layout="all",
                                    progress=False, input_roles={"input_ids": "text", "pixel_values": "image"})
    program = qp.module(compiled=False)
    assert program(*inputs(3)).shape == (3, 10, W)
    with pytest.raises(ShapeError, match="Runtime assertion failed"):
        program(*inputs(1))
