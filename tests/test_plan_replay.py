"""One path: every program is apply(plan). A plan calibrated for any recipe — rotations, smoothing, ATM/OHB included —
replays bit for bit after a save/load round trip, and `quantize(recipe=…)` equals `quantize(plan=…)`."""
import functools

import pytest
import torch

import qvla_compiler
from qvla_compiler import pipeline
from qvla_compiler.calibration import resolve_style
from qvla_compiler.export import capture_policy
from qvla_compiler.meta import Region
from qvla_compiler.models import build_policy
from qvla_compiler.plan import QuantPlan
from qvla_compiler.program import Program, with_noise
from qvla_compiler.recipes import RECIPES

# every preset of `qvla recipes`, the rotations only reachable through options (--rotation / --smooth), and scale
# tuning (a few steps: the replay, not the tuning, is under test)
VARIANTS = {**RECIPES, "w4a8+quarot": RECIPES["w4a8"].with_(rotation="quarot"),
            "w4a4+hadamard+smoothquant": RECIPES["w4a4"].with_(rotation="hadamard", smooth="smoothquant"),
            "quantvla-w4a8+gptq+tune": RECIPES["quantvla-w4a8"].with_(weight_method="gptq", tune_steps=3),
            "omega-w4a4+backbone-a8": RECIPES["omega-w4a4"].with_(backbone_a_bits=8)}


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    policy = build_policy(name)
    obs = policy.example_inputs()
    noise = policy.example_noise(next(iter(obs.values())).shape[0])
    batches = list(with_noise(policy.calibration_batches(1, seed=0), tuple(noise.shape[1:]), 0))
    return policy, Program(capture_policy(policy, obs, noise), policy.schedule), batches, (obs, noise)


def _same_program(a: Program, b: Program) -> None:
    assert a.graphs.keys() == b.graphs.keys()
    for name, ga in a.graphs.items():
        gb = b.graphs[name]
        assert ga.code == gb.code, name
        sa, sb = ga.state_dict(), gb.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(VARIANTS))
@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_every_recipe_replays_bit_identically_from_a_saved_plan(tmp_path, name, recipe):
    policy, program, batches, inputs = _captured(name)
    rec = VARIANTS[recipe]
    plan = pipeline.calibrate(program, rec, batches, model=name, atm_style=resolve_style(rec, policy), progress=False)
    direct = program.fork()
    pipeline.apply(direct, plan)
    plan.save(tmp_path / "plan")
    replayed = program.fork()
    pipeline.apply(replayed, QuantPlan.load(tmp_path / "plan"))
    _same_program(direct, replayed)
    out, ref = direct.run(inputs), program.run(inputs)
    assert torch.equal(out, replayed.run(inputs))
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.5  # quantized (not the float program), and sane
    if rec.rotation != "none" or rec.smooth != "none":
        assert any(m.extra.get("rotation") for m in plan.modules.values())
    if rec.backbone_a_bits:
        assert {(Region(m.region).value, m.spec.a_bits) for m in plan.quantized} == {("backbone", 8), ("action_head", 4)}
    if rec.atm or rec.ohb:
        assert plan.attention and plan.attention["graphs"], "ATM/OHB recipes carry their α/β in the plan"


def test_quantize_with_a_recipe_equals_quantize_with_its_saved_plan(tmp_path):
    policy, _, _, _ = _captured("pi05-tiny")
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe="quantvla-w4a8", calib_steps=1,
                                progress=False, model_name="pi05-tiny")
    qp.quant_plan.save(tmp_path / "plan")
    again = qvla_compiler.quantize(policy, policy.example_inputs(), plan=tmp_path / "plan", progress=False,
                                   model_name="pi05-tiny")
    _same_program(qp.program, again.program)
    assert qp.report == again.report and qp.plan == again.plan
    assert qp.report.attention_scales is not None  # ATM/OHB ran, and the replay reports the same α/β


def test_format_1_plans_are_refused_with_the_fix(tmp_path):
    policy, program, batches, _ = _captured("pi05-tiny")
    plan = pipeline.calibrate(program, RECIPES["w8a8"], batches[:1], model="pi05-tiny", progress=False)
    plan.format = 1
    plan.save(tmp_path / "old")
    with pytest.raises(qvla_compiler.QvlaError, match="format 1.*Re-run `qvla calibrate"):
        QuantPlan.load(tmp_path / "old")


def test_a_plans_program_holds_no_transformed_float_copy_and_no_cached_operand(monkeypatch):
    """Building from a plan under DuQuant + ATM/OHB: the integer linears' float weights are not rotated again (the
    plan has their integers; lowering drops the float weight), and the ATM/OHB student's runs leave no fp32 operand
    cached on the plan's integer weights, which outlive the student (both were full copies at full size)."""
    from qvla_compiler.kernels import cpu_gemm
    from qvla_compiler.passes import rotate_common

    policy, program, batches, _ = _captured("groot-tiny")
    rec = RECIPES["quantvla-w4a8"]
    replaced, real = [], rotate_common.replace_input  # per weight replaced: did its linear hold integers already?

    def spy(gm, node, *rest):
        replaced.append("qvla_tensors" in node.meta)
        return real(gm, node, *rest)

    monkeypatch.setattr(rotate_common, "replace_input", spy)
    plan = pipeline.calibrate(program, rec, batches, model="groot-tiny", atm_style=resolve_style(rec, policy),
                              progress=False)
    assert replaced and not any(replaced)  # calibration rotates the fork's float weights, before any integer exists
    assert plan.attention and plan.attention["graphs"]  # the student ran
    integers = [t for m in plan.modules.values() for k, t in m.tensors.items() if k == "weight_q"]
    assert integers and not any(id(t) in cpu_gemm._WEIGHT_CACHE for t in integers)
    replaced.clear()
    pipeline.apply(program.fork(), plan)
    assert replaced == []
