"""torch.compile(backend="qvla"): the plan applied to Dynamo graphs matches the AOT program on both policies."""
import copy
import warnings
from importlib.metadata import entry_points

import pytest
import torch

import qvla_compiler
from policy_fixtures import policy_args, quantized_policy, unmoved_program
from qvla_compiler.models.sampling import euler_sample
from qvla_compiler.plan import PlanError, QuantPlan

OBS = ("images", "tokens", "token_mask", "state")
# plain W8A8, and the headline recipe (DuQuant rotations + ATM/OHB) on both policies: the backend applies plans with
# the same pipeline.apply as `quantize`, so every recipe works through torch.compile
CASES = [("pi05-tiny", "w8a8"), ("pi05-tiny", "quantvla-w4a8"), ("groot-tiny", "quantvla-w4a8")]


def _sample(policy, prefix_fn, denoise_fn, args):
    with torch.no_grad():
        return euler_sample(prefix_fn, denoise_fn, dict(zip(OBS, args[:4])), args[4], policy.schedule)


def test_backend_is_registered_by_import_and_by_entry_point():
    import qvla_compiler.backend as be

    assert "qvla" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("qvla") is be.qvla_backend
    eps = entry_points(group="torch_dynamo_backends")
    assert "qvla" in eps.names and eps["qvla"].value == "qvla_compiler.backend:qvla_backend"
    assert isinstance(qvla_compiler.backend(plan=QuantPlan("m", {}, {})), be.QvlaBackend)


# pi05's headline recipe repeats groot's through the same backend path: `-m small` runs it (suite budget)
BIT_CASES = [CASES[0], pytest.param(*CASES[1], marks=pytest.mark.small), CASES[2]]


@pytest.mark.parametrize("name,recipe", BIT_CASES)
def test_rewritten_dynamo_graphs_are_bit_identical_to_the_aot_program(name, recipe):
    """Without Inductor, the rewritten torch-IR graphs compute exactly what the exported program computes before
    work moves out of the denoise loop; after it, to the rounding of the float GEMMs table_time_values batches."""
    policy, qp = quantized_policy(name, recipe)
    plan = copy.deepcopy(qp.quant_plan)
    be = qvla_compiler.backend(plan=plan, inductor=False)
    denoise = torch.compile(policy.denoise_step, backend=be, fullgraph=True)
    prefix = torch.compile(policy.embed_prefix, backend=be)
    args = policy_args(policy)
    got = _sample(policy, prefix, denoise, args)
    with torch.no_grad():
        assert torch.equal(got, unmoved_program(policy, plan).as_module()(*args))
        torch.testing.assert_close(got, qp.module()(*args), rtol=0.05, atol=0.02)
    assert sum(len(m.quantized) for m in be.graphs) == qp.report.int_linears
    assert all(not m.unmatched for m in be.graphs), be.summary()
    ops = [str(n.target) for gm in be.graph_modules for n in gm.graph.nodes if n.op == "call_function"]
    lowered = "qvla.int8_linear.default" if recipe.startswith("w8") else "qvla.int4_linear.default"
    assert ops.count(lowered) == qp.report.int_linears


# one Inductor build per case (about 1 min each here): the headline recipes are slow_compile, deselected by default
INDUCTOR_CASES = [CASES[0], *(pytest.param(*c, marks=pytest.mark.slow_compile) for c in CASES[1:])]


@pytest.mark.parametrize("name,recipe", INDUCTOR_CASES)
def test_inductor_compiled_policy_matches_the_aot_program(tmp_path, name, recipe, monkeypatch):
    from qvla_compiler.kernels import inductor

    registered, real = [], inductor.register
    monkeypatch.setattr(inductor, "register", lambda: registered.append(real.__wrapped__()))
    policy, qp = quantized_policy(name, recipe)
    copy.deepcopy(qp.quant_plan).save(tmp_path / "plan")
    opts = {"plan": str(tmp_path / "plan")}
    torch._dynamo.reset()
    denoise = torch.compile(policy.denoise_step, backend="qvla", options=opts, fullgraph=True)
    prefix = torch.compile(policy.embed_prefix, backend="qvla", options=opts)
    args = policy_args(policy)
    out = _sample(policy, prefix, denoise, args)
    with torch.no_grad():
        ref = qp.module()(*args)
    # Inductor fuses the float ops differently (fp32 reassociation). An ulp of difference before qvla::quantize_act
    # can move an activation across a rounding boundary (one integer step), so the match is close, not exact
    # (measured: pi05 W8A8 1e-7, groot W4A8 2.3e-3), and far below the quantization error itself.
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 5e-3 and rel < 0.1 * qp.report.action_rel_l2, (rel, qp.report.action_rel_l2)
    # the backend registered the qvla:: decompositions before each compile_fx, so the ops fused there too
    assert registered and all("qvla::int8_linear" in r for r in registered)


def test_plan_that_does_not_fit_is_named():
    policy, qp = quantized_policy("pi05-tiny", "w8a8")
    other, qp_other = quantized_policy("groot-tiny", "w4a8")
    prefix = policy_args(policy)[:4]
    # same module paths and shapes, other weights: the fingerprint says so
    be = qvla_compiler.backend(plan=copy.deepcopy(qp_other.quant_plan), inductor=False)
    with pytest.raises(Exception, match="differ from the ones the plan was calibrated on"), torch.no_grad():
        torch.compile(policy.embed_prefix, backend=be)(*prefix)
    # no module path in common (and no float fingerprint, by which a tied weight is matched): how many matched, and
    # what both sides' names look like
    plan = copy.deepcopy(qp.quant_plan)
    plan.modules = {"enc_" + k.replace(".", "_"): v for k, v in plan.modules.items()}
    for entry in plan.modules.values():
        entry.extra.pop("fingerprint", None)
    with pytest.raises(Exception, match="does not fit this model") as info, torch.no_grad():
        torch.compile(policy.embed_prefix, backend=qvla_compiler.backend(plan=plan, inductor=False))(*prefix)
    assert "0 integer from the plan" in str(info.value) and "27 not in the plan" in str(info.value)
    with pytest.raises(Exception, match="needs a plan"), torch.no_grad():
        torch.compile(policy.embed_prefix, backend="qvla")(*prefix)


def test_partial_plan_warns_with_the_unmatched_linears():
    policy, qp = quantized_policy("pi05-tiny", "w8a8")
    plan = copy.deepcopy(qp.quant_plan)
    dropped = plan.quantized[0].module_path
    del plan.modules[dropped]
    be = qvla_compiler.backend(plan=plan, inductor=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(policy.embed_prefix, backend=be)(*policy_args(policy)[:4])
    assert any(dropped in str(w.message) and "1 not in the plan" in str(w.message) for w in caught)
    strict = qvla_compiler.backend(plan=plan, inductor=False, strict=True)
    with pytest.raises(Exception, match=dropped.replace(".", r"\.")), torch.no_grad():
        torch.compile(policy.embed_prefix, backend=strict)(*policy_args(policy)[:4])


@pytest.mark.parametrize("name,inductor", [("tied_weights", False), ("gpt2_conv1d", False), ("torch_mha", True),
                                           ("autocast_block", False), ("einsum_projections", False)])
def test_zoo_shapes_through_the_backend_match_the_program(name, inductor):
    """Shapes the backend got wrong: a tied LM head, whose weight Dynamo names `embed_tokens.weight`, stayed float
    (matched to the plan now by shape and fingerprint); that fingerprint must not rename GPT-2's square Conv1D
    weight, which the plan knows as its transposed copy; nn.MultiheadAttention under DuQuant failed Inductor's stride
    check on qvla::block_rotate's transposed input; Dynamo's `_enter_autocast` calls made torch.export trace an
    autocast block without its casts (a dtype error)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "passes"))
    from test_zoo import ZOO

    case = ZOO[name]
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    qp = qvla_compiler.quantize(module, args, calib, "quantvla-w4a8", layout="all", progress=False)
    be = qvla_compiler.backend(plan=qp.quant_plan, strict=True, inductor=inductor)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=be)(*args)
    want = qp.module(compiled=False)(*args)
    assert sum(len(m.quantized) for m in be.graphs) == qp.report.int_linears
    assert torch.equal(got, want) if not inductor else torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_graph_inductor_cannot_compile_runs_the_integer_graph_eagerly_with_a_warning():
    """flex_attention does not lower on this CPU: the backend warns and runs the rewritten graph (as `module()`
    falls back), instead of failing the user's torch.compile."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "passes"))
    from test_zoo import ZOO

    case = ZOO["flex_attention_expert"]
    torch.manual_seed(0)
    module, args = case.build().eval(), case.inputs()
    qp = qvla_compiler.quantize(module, args, [case.inputs()], "w8a8", layout="all", progress=False,
                                input_roles=case.input_roles)
    be = qvla_compiler.backend(plan=qp.quant_plan)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="Inductor could not compile"), torch.no_grad():
        got = torch.compile(module, backend=be)(*args)
    assert torch.equal(got, qp.module(compiled=False)(*args))


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_second_batch_size_compiles_again_instead_of_failing(dynamic):
    """torch.compile's default makes the batch symbolic on the second batch size (and dynamic=True on the first):
    Dynamo then passes SymInt inputs, which the capture took for tensors ('Unsupported input type torch.SymInt').
    The backend now builds one program per concrete shape, each equal to the quantized program at that batch."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    qp = qvla_compiler.quantize(module, (torch.randn(2, 5, 16),), [(torch.randn(2, 5, 16),)], "w8a8", layout="all",
                                progress=False)
    be = qvla_compiler.backend(plan=qp.quant_plan, inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=be, dynamic=dynamic)
    for batch in (2, 3, 1):
        x = torch.randn(batch, 5, 16)
        with torch.no_grad():
            assert torch.equal(compiled(x), qp.module(compiled=False)(x))
    assert all(len(m.quantized) == 2 for m in be.graphs)
