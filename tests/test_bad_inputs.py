"""Bad input, table-driven: every case gets its named QvlaError, a message that says how to fix it, exit code 2 from
the CLI, no traceback, and no file left behind — and the CLI cases fail before any model is built.

CLI cases run in-process through `cli.main` (a subprocess per case would cost a torch import each); the signal
cases, which need a real process, are in test_cli.py.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import qvla_compiler
from qvla_compiler import cli
from qvla_compiler.errors import (ArtifactError, CalibrationError, ModelNotFoundError, QvlaError, RecipeError,
                                  UsageError)
from qvla_compiler.plan import PlanError, QuantPlan, as_plan
from qvla_compiler.recipes import QuantRecipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases point at: a valid plan (of a policy) and program (of a small module: saving a policy program
    takes far longer), corrupt copies, a plain file and a folder."""
    root = tmp_path_factory.mktemp("inputs")
    policy = qvla_compiler.models.build_policy("pi05-tiny")
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe="w8a8", calib_steps=1, progress=False)
    copy.deepcopy(qp.quant_plan).save(root / "plan")
    module, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(4, 16)
    qvla_compiler.quantize(module, (x,), [(x,)], "w8a8", layout="all", progress=False).save(root / "good.pt2")
    for name, text in {"bad_json": "{not json", "list_json": "[]", "old_format": '{"format": 99}'}.items():
        (root / name).mkdir()
        (root / name / "plan.json").write_text(text)
    (root / "truncated").mkdir()
    (root / "truncated" / "plan.json").write_text((root / "plan" / "plan.json").read_text())
    tensors = (root / "plan" / "tensors.safetensors").read_bytes()
    (root / "truncated" / "tensors.safetensors").write_bytes(tensors[: len(tensors) // 3])
    (root / "text.pt2").write_text("not a zip archive")
    (root / "cut.pt2").write_bytes((root / "good.pt2").read_bytes()[:5000])
    torch.export.save(torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),)), root / "foreign.pt2")
    (root / "a_file").write_text("x")
    (root / "a_dir").mkdir()
    return root


# (argv, error class name, a phrase of the fix the message must give); {d} is the fixture folder.
CLI_CASES = [
    (["quantize", "--model", "pi07-huge"], ModelNotFoundError, "valid names are"),
    (["quantize", "--model", "pi05-tiny", "--recipe", "w3a3"], RecipeError, "choose one of"),
    (["quantize", "--model", "pi05-tiny", "--calib-steps", "0"], UsageError, "at least 1"),
    (["quantize", "--model", "pi05-tiny", "--calib-steps", "-4"], UsageError, "at least 1"),
    (["quantize", "--model", "pi05-tiny", "--out", "{d}/a_dir"], UsageError, "give a file name"),
    (["quantize", "--model", "pi05-tiny", "--out", "{d}/a_file/x.pt2"], UsageError, "choose another path"),
    (["quantize", "--model", "pi05-tiny", "--out", "{d}/a_file/deeper/x.pt2"], UsageError, "choose another path"),
    (["quantize", "--model", "pi05-tiny", "--out", "/proc/qvla.pt2"], UsageError, "writable folder"),
    (["quantize", "--model", "pi05-tiny", "--dump-dir", "{d}/a_file"], UsageError, "give a folder path"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/missing"], PlanError, "qvla calibrate"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/bad_json"], PlanError, "re-run `qvla calibrate`"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/list_json"], PlanError, "re-run `qvla calibrate`"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/old_format"], PlanError, "re-run `qvla calibrate"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/truncated"], PlanError, "re-run `qvla calibrate`"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/plan", "--recipe", "w4a4"], PlanError, "drop those"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/plan", "--layout", "all"], PlanError, "drop those"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/plan", "--rotation", "hadamard"], PlanError, "drop those"),
    (["quantize", "--model", "pi05-tiny", "--plan", "{d}/plan", "--smooth", "smoothquant"], PlanError, "drop those"),
    (["calibrate", "--model", "pi05-tiny", "--recipe", "w2a2", "--out", "{d}/p2"], RecipeError, "choose one of"),
    (["quantize", "--model", "pi05-tiny", "--layout", "auto"], RecipeError, "--bpw"),
    (["calibrate", "--model", "pi05-tiny", "--layout", "auto", "--bpw", "1.5", "--out", "{d}/p2"], RecipeError, "[2, 16]"),
    (["calibrate", "--model", "nope", "--out", "{d}/p2"], ModelNotFoundError, "valid names are"),
    (["calibrate", "--model", "pi05-tiny", "--out", "{d}/a_file"], UsageError, "give a folder path"),
    (["calibrate", "--model", "pi05-tiny", "--calib-steps", "0", "--out", "{d}/p2"], UsageError, "at least 1"),
    (["inspect", "{d}/missing.pt2"], ArtifactError, "(it does not exist); write one with `qvla quantize"),
    (["inspect", "{d}/text.pt2"], ArtifactError, "qvla quantize"),
    (["inspect", "{d}/cut.pt2"], ArtifactError, "qvla quantize"),
    (["inspect", "{d}/foreign.pt2"], ArtifactError, "qvla quantize"),
    (["inspect", "{d}/a_dir"], ArtifactError, "(it is a directory, not a .pt2 file); write one"),
    (["inspect", "{d}/good.pt2", "--html", "{d}/a_file/page.html"], UsageError, "choose another path"),
    (["inspect", "{d}/good.pt2", "--dot", "{d}/a_dir"], UsageError, "give a file name"),
    (["diff", "{d}/missing.pt2", "{d}/good.pt2"], ArtifactError, "qvla quantize"),
    (["diff", "{d}/good.pt2", "{d}/cut.pt2"], ArtifactError, "qvla quantize"),
    (["eval", "--episodes", "0"], UsageError, "at least 1"),
    (["eval", "--model", "pi09-tabletop"], ModelNotFoundError, "valid names are"),
    (["eval", "--model", "pi05-tiny", "--recipe", "int3"], RecipeError, "choose one of"),
    (["eval", "--save-video", "{d}/a_dir"], UsageError, "give a file name"),
]
ARGPARSE_CASES = [["quantize", "--layout", "everything"], ["quantize", "--rotation", "spin"], ["calibrate"],
                  ["frobnicate"], ["quantize", "--calib-steps", "many"], ["eval", "--suite", "libero2"]]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("argv, error, fix", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_cli_bad_input(argv, error, fix, as_json, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    monkeypatch.setattr("qvla_compiler.models.build_policy", _no_build)  # every case must fail before building
    before = _tree(files)
    code = cli.main([a.format(d=files) for a in argv] + (["--json"] if as_json else []))
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    if as_json:
        doc = json.loads(out)
        assert doc["error"] == error.__name__ and fix.lower() in doc["message"].lower()
    else:
        assert f"{error.__name__}:" in err and fix.lower() in " ".join(err.split()).lower()
    assert _tree(files) == before, "a failed command left files behind"


def _no_build(*args, **kwargs):
    raise AssertionError("the model was built before the bad option was found")


@pytest.mark.parametrize("argv", ARGPARSE_CASES, ids=" ".join)
def test_cli_usage_errors_exit_2_with_usage_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: qvla" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def policy():
    return qvla_compiler.models.build_policy("pi05-tiny")


def _obs_with(policy, **changes):
    obs = {**policy.example_inputs(), **changes}
    return {k: v for k, v in obs.items() if v is not None}


# (what to call, error class, phrase of the fix); each gets the tiny policy and a plain module.
API_CASES = {
    "empty calibration": (lambda p, m: qvla_compiler.quantize(p, p.example_inputs(), [], progress=False),
                          CalibrationError, "pass at least one batch"),
    "NaN in calibration": (lambda p, m: qvla_compiler.quantize(
        p, p.example_inputs(), [_obs_with(p, state=torch.full((2, 8), float("nan")))], progress=False),
        CalibrationError, "clean or re-normalise"),
    "calibration key missing": (lambda p, m: qvla_compiler.quantize(
        p, p.example_inputs(), [_obs_with(p, state=None)], progress=False), CalibrationError, "build batches like"),
    "calibration dtype": (lambda p, m: qvla_compiler.quantize(
        p, p.example_inputs(), [_obs_with(p, tokens=p.example_inputs()["tokens"].float())], progress=False),
        CalibrationError, "convert or reshape"),
    "calibration shape": (lambda p, m: qvla_compiler.quantize(
        p, p.example_inputs(), [_obs_with(p, state=torch.zeros(2, 3))], progress=False),
        CalibrationError, "convert or reshape"),
    "calibration dtype, lazy batches": (lambda p, m: qvla_compiler.quantize(
        p, p.example_inputs(), (b for b in [_obs_with(p, state=p.example_inputs()["state"].double())]),
        recipe="w8a8", progress=False), CalibrationError, "convert or reshape"),
    "module without calibration": (lambda p, m: qvla_compiler.quantize(m, (torch.randn(4, 16),), None),
                                   CalibrationError, "pass calib="),
    "module calibration shape": (lambda p, m: qvla_compiler.quantize(
        m, (torch.randn(4, 16),), [(torch.randn(4, 15),)], layout="all", progress=False),
        CalibrationError, "convert or reshape"),
    "module calibration arity": (lambda p, m: qvla_compiler.quantize(
        m, (torch.randn(4, 16),), [(torch.randn(4, 16), torch.randn(4, 16))], layout="all", progress=False),
        CalibrationError, "build batches like"),
    "unknown recipe": (lambda p, m: qvla_compiler.quantize(m, (torch.randn(4, 16),), [], recipe="w5a8"),
                       RecipeError, "choose one of"),
    "unknown layout": (lambda p, m: qvla_compiler.quantize(m, (torch.randn(4, 16),), [], layout="most"),
                       RecipeError, "choose one of"),
    "bad recipe bits": (lambda p, m: QuantRecipe("mine", w_bits=5), RecipeError, "must be one of (2, 3, 4, 8)"),
    "load missing program": (lambda p, m: qvla_compiler.load("/nonexistent/x.pt2"), ArtifactError, "qvla quantize"),
    "plan of wrong type": (lambda p, m: as_plan(123), PlanError, "path to a plan folder"),
    "plan folder missing": (lambda p, m: QuantPlan.load("/nonexistent/plan"), PlanError, "qvla calibrate"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_api_bad_input(case, policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, error, fix = API_CASES[case]
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(error) as info:
        call(policy, module)
    assert isinstance(info.value, QvlaError) and fix.lower() in str(info.value).lower()
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("asked", [{"recipe": "w4a4"}, {"layout": "all"}, {"recipe": "w8a8", "layout": "strict"}])
def test_api_plan_beside_another_recipe_or_layout_is_refused(asked, files, policy):
    with pytest.raises(PlanError, match="drop recipe/layout"):
        qvla_compiler.quantize(policy, policy.example_inputs(), plan=files / "plan", progress=False, **asked)


def test_the_table_is_big_enough():
    assert len(CLI_CASES) * 2 + len(ARGPARSE_CASES) + len(API_CASES) >= 40
