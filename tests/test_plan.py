"""QuantPlan: calibrate → save → load → quantize is bit-identical to calibrate → quantize; misfits are named."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import qvla_compiler
from policy_fixtures import policy_args, quantized_policy
from qvla_compiler.models import build_policy
from qvla_compiler.plan import PLAN_JSON, PLAN_TENSORS, PlanError, QuantPlan


def _assert_programs_identical(a, b):
    assert a.program.graphs.keys() == b.program.graphs.keys()
    for name, ga in a.program.graphs.items():
        gb = b.program.graphs[name]
        assert ga.code == gb.code, name
        sa, sb = ga.state_dict(), gb.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert a.report == b.report and a.plan == b.plan


@pytest.mark.parametrize("recipe", ["w4a8"])  # every other preset: test_plan_replay.py (pipeline level)
def test_plan_round_trip_is_bit_identical_on_pi05_tiny(tmp_path, recipe):
    policy, qp = quantized_policy("pi05-tiny", recipe)
    copy.deepcopy(qp.quant_plan).save(tmp_path / "plan")
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == [PLAN_JSON, PLAN_TENSORS]  # no pickle
    plan = QuantPlan.load(tmp_path / "plan")
    qp2 = qvla_compiler.quantize(policy, policy.example_inputs(), plan=plan, progress=False, model_name="pi05-tiny")
    _assert_programs_identical(qp, qp2)
    args = policy_args(policy)
    assert torch.equal(qp.module()(*args), qp2.module()(*args))


def test_applying_a_plan_shares_its_integer_weights_and_changes_none_of_them():
    """The program holds the plan's integer weights, not copies (at full size a copy is ~1 GB more), and building it
    (ATM/OHB folded into dequant scales included) writes into no plan tensor."""
    policy = build_policy("pi05-tiny")
    plan = qvla_compiler.calibrate(policy, policy.example_inputs(), recipe="quantvla-w4a8", calib_steps=1,
                                   progress=False)
    before = {(e.module_path, k): t.clone() for e in plan.modules.values() for k, t in e.tensors.items()}
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), plan=plan, progress=False)
    assert plan.attention  # α/β were folded into the program's scales
    shared = {t.data_ptr() for gm in qp.program.graphs.values() for t in gm.buffers()}
    assert plan.quantized and all(e.tensors["weight_q"].data_ptr() in shared for e in plan.quantized)
    for (path, key), old in before.items():
        assert torch.equal(plan.modules[path].tensors[key], old), (path, key)


def test_plan_is_keyed_by_module_path_and_carries_extras(tmp_path):
    policy, qp = quantized_policy("pi05-tiny", "w4a8")
    plan = copy.deepcopy(qp.quant_plan)
    assert {r.module_path for r in qp.report.linears} == set(plan.modules)
    entry = plan.quantized[0]
    assert entry.spec.w_bits == 4 and entry.tensors["weight_q"].dtype == torch.int8
    assert policy.get_parameter(entry.module_path + ".weight").shape == (entry.out_features, entry.in_features)
    # other passes attach optional tensors / JSON per module path; they survive a round trip
    entry.tensors["rotation"] = torch.eye(4)
    entry.extra["alpha"] = [1.0, 0.5]
    plan.save(tmp_path / "p")
    back = QuantPlan.load(tmp_path / "p")[entry.module_path]
    assert torch.equal(back.tensors["rotation"], torch.eye(4)) and back.extra["alpha"] == [1.0, 0.5]
    doc = json.loads((tmp_path / "p" / PLAN_JSON).read_text())
    assert doc["recipe"]["name"] == "w4a8" and doc["modules"][entry.module_path]["spec"]["w_bits"] == 4


def test_plan_that_does_not_fit_is_named(tmp_path):
    policy, qp = quantized_policy("pi05-tiny", "w4a8")
    copy.deepcopy(qp.quant_plan).save(tmp_path / "plan")
    other = build_policy("groot-tiny")
    with pytest.raises(PlanError, match="does not cover|another model"):
        qvla_compiler.quantize(other, other.example_inputs(), plan=tmp_path / "plan", progress=False)
    reseeded = build_policy("pi05-tiny", seed=1, pretrained=False)
    with pytest.raises(PlanError, match="differ from the ones the plan was calibrated on"):
        qvla_compiler.quantize(reseeded, reseeded.example_inputs(), plan=tmp_path / "plan", progress=False)
    with pytest.raises(PlanError, match="no plan at"):
        QuantPlan.load(tmp_path / "missing")


def test_cli_calibrate_then_quantize_with_plan(tmp_path):
    run = [sys.executable, "-m", "qvla_compiler.cli"]
    res = subprocess.run([*run, "calibrate", "--model", "pi05-tiny", "--recipe", "w8a8", "--calib-steps", "2",
                          "--out", str(tmp_path / "plan"), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["quantized"] == 20 and summary["modules"] == 50
    # each phase is listed when it ends, so calibrate's own steps come before it
    assert [p["name"] for p in summary["phases"]] == ["build", "capture: export", "capture: float reference",
                                                      "capture", "calibrate: observe",
                                                      "calibrate: quantize weights", "calibrate", "save"]
    res = subprocess.run([*run, "quantize", "--model", "pi05-tiny", "--plan", str(tmp_path / "plan"), "--out",
                          str(tmp_path / "p.pt2"), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["int_linears"] == 20


class _OneMLPTwoPasses(torch.nn.Module):
    """One MLP run on the prefix, then on the action tokens (EO1 runs its LM so): one weight, two regions."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.action_in = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32), torch.nn.Linear(8, 32)

    def forward(self, prefix_emb, x_t):
        mlp = lambda x: x + self.down(torch.relu(self.up(x)))  # noqa: E731
        return mlp(prefix_emb), mlp(self.action_in(x_t))


def test_a_weight_shared_by_two_regions_keeps_each_call_sites_region_through_a_plan(tmp_path):
    module, args = _OneMLPTwoPasses().eval(), (torch.randn(2, 10, 32), torch.randn(2, 6, 8))
    qp = qvla_compiler.quantize(module, args, [args], "w8a8", layout="all", progress=False,
                                input_roles={"prefix_emb": "text"})
    want = [("up", 0, "backbone"), ("down", 0, "backbone"), ("action_in", 0, "action_head"),
            ("up", 1, "action_head"), ("down", 1, "action_head")]
    assert [(r.module_path, r.call_site, r.region) for r in qp.report.linears] == want  # site 1 was backbone
    qp.quant_plan.save(tmp_path / "p")
    again = qvla_compiler.quantize(module, args, plan=str(tmp_path / "p"), progress=False,
                                   input_roles={"prefix_emb": "text"})
    assert [(r.module_path, r.call_site, r.region) for r in again.report.linears] == want
