"""`module()` is the fast program by default: Inductor-compiled, lazily, with an eager escape and a one-warning
fallback. conftest sets QVLA_COMPILE=0 for the rest of the suite; these tests set or unset it themselves."""
import warnings

import pytest
import torch

import qvla_compiler
from policy_fixtures import policy_args, quantized_policy
from qvla_compiler.kernels import inductor
from qvla_compiler.program import PolicyProgram


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy, qp = quantized_policy("pi05-tiny", "w8a8")
    path = qp.save(tmp_path_factory.mktemp("compiled") / "pi05-tiny-w8a8.pt2")
    return policy, qp, path


@pytest.fixture
def compile_on(monkeypatch):
    monkeypatch.delenv("QVLA_COMPILE", raising=False)


def _parts(m):
    return m.prefix, m.denoise


@pytest.mark.slow_compile
def test_loaded_module_is_compiled_by_default_and_matches_eager(saved, compile_on, monkeypatch):
    policy, qp, path = saved
    loaded = qvla_compiler.load(path)
    m, eager = loaded.module(), loaded.module(compiled=False)
    assert isinstance(m, PolicyProgram) and all(isinstance(p, inductor.LazyCompiled) for p in _parts(m))
    assert all(p.compiled is None for p in _parts(m)), "module() must not compile before the first call"
    import torch._inductor.compile_fx as inductor_fx

    graphs, real = [], inductor_fx.compile_fx

    def counting(gm, *args, **kwargs):
        graphs.append(gm)
        return real(gm, *args, **kwargs)
    monkeypatch.setattr(inductor_fx, "compile_fx", counting)
    args = policy_args(policy)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: Inductor compiled it
        got, want = m(*args), eager(*args)
    assert len(graphs) >= 2 and all(p.compiled is not None and p.fallback.reason is None for p in _parts(m))
    # Inductor reorders float ops (layer norms, softmax) before qvla::quantize_act: an ulp can move an activation
    # across a rounding boundary, so compiled == eager within the reordering tolerance of tests/test_backend.py
    # (measured here: 1.2e-7), far below the quantization error itself.
    rel = float((got - want).norm() / want.norm())
    assert rel < 5e-3 and rel < 0.1 * qp.report.action_rel_l2, (rel, qp.report.action_rel_l2)


def test_eager_escape_is_the_program_as_before(saved, compile_on, monkeypatch):
    policy, qp, path = saved
    loaded, args = qvla_compiler.load(path), policy_args(policy)
    eager = loaded.module(compiled=False)
    assert not any(isinstance(p, inductor.LazyCompiled) for p in _parts(eager))
    eps = loaded.exported_programs
    before = PolicyProgram(eps["prefix"].module(), eps["denoise"].module(), loaded.schedule)  # what module() was
    with torch.no_grad():
        assert torch.equal(eager(*args), before(*args))
        assert torch.equal(qp.module(compiled=False)(*args), qp.program.as_module()(*args))
    assert isinstance(qp.module().prefix, inductor.LazyCompiled)  # the in-memory program compiles by default too
    monkeypatch.setenv("QVLA_COMPILE", "0")
    assert not isinstance(loaded.module().prefix, inductor.LazyCompiled)
    assert isinstance(loaded.module(compiled=True).prefix, inductor.LazyCompiled)


def test_no_compiler_falls_back_to_eager_with_one_warning(saved, compile_on, monkeypatch):
    policy, qp, path = saved
    calls = []

    def broken(module, **_):
        def run(*args, **kwargs):
            calls.append(module)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return run
    monkeypatch.setattr(inductor, "compile_program", broken)
    loaded, args = qvla_compiler.load(path), policy_args(policy)
    m = loaded.module()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = m(*args)
        again = m(*args)
        want = loaded.module(compiled=False)(*args)
    ours = [w for w in caught if "Inductor could not compile" in str(w.message)]
    assert len(ours) == 1 and "C++ compiler" in str(ours[0].message) and "QVLA_COMPILE=0" in str(ours[0].message)
    assert len(calls) == 1, "after one failure, no part of the program tries to compile again"
    assert torch.equal(got, want) and torch.equal(again, want)
    # an error of the caller's (wrong inputs) is raised as the eager program raises it, not turned into a warning
    m2 = loaded.module()
    with pytest.raises(Exception), torch.no_grad():
        m2(*args[:4], args[4][:, :1, :1])


def test_float_dtype_bf16_runs_the_float_linears_in_bf16_and_plans_replay_it(saved, tmp_path):
    import copy
    import functools

    from qvla_compiler.lowering import native_bf16
    from qvla_compiler.passes import _graph as g
    from qvla_compiler.plan import QuantPlan

    policy, qp, _ = saved
    plan = copy.deepcopy(qp.quant_plan)
    plan.recipe = {**plan.recipe, "float_dtype": "bf16"}
    plan.save(tmp_path / "plan")  # the recipe, float_dtype included, travels with the plan
    replayed = QuantPlan.load(tmp_path / "plan")
    assert replayed.recipe_object().float_dtype == "bf16"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qp16 = qvla_compiler.quantize(policy, policy.example_inputs(), plan=replayed, progress=False)
    assert any("without native bf16" in str(w.message) for w in caught) == (not native_bf16())
    weights = [functools.reduce(getattr, n.args[1].target.split("."), gm) for gm in qp16.program.graphs.values()
               for n in g.linear_nodes(gm) if n.args[1].op == "get_attr"]  # the linears left float by the layout
    assert len(weights) == qp16.report.float_linears and all(w.dtype == torch.bfloat16 for w in weights), \
        (qp16.report.float_linears, [w.dtype for w in weights])
    # bf16 keeps 8 mantissa bits in the float part: measured action rel-L2 vs float 0.0060 (fp32 float part) ->
    # 0.0069 (bf16) on pi05-tiny W8A8; allow 0.02 on top of the fp32 program's error
    assert qp16.recipe.float_dtype == "bf16"
    assert qp16.report.action_rel_l2 < qp.report.action_rel_l2 + 0.02, (qp16.report.action_rel_l2,
                                                                         qp.report.action_rel_l2)
    args = policy_args(policy)
    with torch.no_grad():
        got, want = qp16.module(compiled=False)(*args), qp.module(compiled=False)(*args)
    assert got.dtype == torch.float32 and float((got - want).norm() / want.norm()) < 0.02


@pytest.mark.slow_compile
def test_aot_package_loads_only_when_trusted_and_matches_eager(saved, tmp_path):
    from qvla_compiler.errors import ArtifactError

    policy, qp, path = saved
    aot = qp.save_aot(tmp_path / "pi05-tiny-w8a8.aoti.pt2")
    with pytest.raises(ArtifactError, match="AOTInductor package.*trust=True"):
        qvla_compiler.load(aot)  # native code: never by default
    loaded = qvla_compiler.load(aot, trust=True)
    assert loaded.aoti_runners and loaded.meta["aot_inductor"] and loaded.report.to_json() == qp.report.to_json()
    args = policy_args(policy)
    with torch.no_grad():
        got, want = loaded.module()(*args), qvla_compiler.load(path).module(compiled=False)(*args)
    rel = float((got - want).norm() / want.norm())  # reordering tolerance, as for the compiled module()
    assert rel < 5e-3 and rel < 0.1 * qp.report.action_rel_l2, (rel, qp.report.action_rel_l2)


def test_cli_aot_needs_a_saved_program_and_float_dtype_conflicts_with_a_plan(saved, tmp_path, capsys):
    import copy
    import json

    from qvla_compiler.cli import main

    assert main(["quantize", "--model", "pi05-tiny", "--aot", "--no-save", "--json"]) == 2
    assert "drop --no-save" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
    _, qp, _ = saved
    copy.deepcopy(qp.quant_plan).save(tmp_path / "plan")
    assert main(["quantize", "--model", "pi05-tiny", "--plan", str(tmp_path / "plan"), "--float-dtype", "bf16",
                 "--no-save", "--json"]) == 2
    assert "float_dtype" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
