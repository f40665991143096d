"""The `qvla` command: --json output of quantize and inspect, and named errors with exit code 2."""
import json
import os
import signal
import subprocess
import sys

import pytest

QVLA = [sys.executable, "-m", "qvla_compiler.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for runs from a temp dir without an install


def _run(*args, timeout=600):
    return subprocess.run([*QVLA, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pi05.pt2"
    result = _run("quantize", "--model", "pi05-tiny", "--recipe", "w4a8", "--calib-steps", "2", "--out", str(out),
                  "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, json.loads(result.stdout)


def test_quantize_json_has_the_documented_keys(program):
    out, summary = program
    for key in ("model", "recipe", "layout", "int_linears", "float_linears", "bytes_bf16", "bytes_quant",
                "memory_saving", "action_rel_l2", "action_sqnr_db"):
        assert key in summary
    assert summary["model"] == "pi05-tiny" and summary["recipe"] == "w4a8" and summary["layout"] == "quantvla"
    assert summary["int_linears"] == 20 and 0.5 < summary["memory_saving"] < 0.8
    assert {r: row["formats"] for r, row in summary["regions"].items() if row["int"]} == {  # quantvla layout
        "backbone": {"W4A8": 14}, "action_head": {"W4A8": 6}}
    assert summary["dtype"] == "fp32"  # --dtype auto: bf16 only for the -full presets
    assert out.is_file()
    phases = [p["name"] for p in summary["phases"]]  # per-phase wall time and peak RSS (inspect/phases.py)
    assert phases[0] == "build" and phases[-1] == "save" and "calibrate: quantize weights" in phases
    assert all(p["seconds"] >= 0 and p["peak_rss_gb"] > 0 for p in summary["phases"])
    assert summary["peak_rss_gb"] == max(p["peak_rss_gb"] for p in summary["phases"])


def test_calibrate_takes_the_recipe_overrides_quantize_takes(tmp_path):
    # a plan conflict tells the user to re-run `qvla calibrate` with --rotation / --smooth / --weights: it must take them
    result = _run("calibrate", "--model", "pi05-tiny", "--recipe", "w4a8", "--weights", "gptq", "--rotation",
                  "hadamard", "--calib-steps", "1", "--out", str(tmp_path / "plan"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["recipe"] == "w4a8+hadamard+gptq"
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert '"weight_method": "gptq"' in json.dumps(plan) and '"rotation": "hadamard"' in json.dumps(plan)


def test_recipes_lists_the_presets_and_the_options_a_name_takes(capsys):
    from qvla_compiler import cli
    from qvla_compiler.recipes import OPTIONS, RECIPES, recipe_from_name

    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    options = out.split("options (recipe+option+...):")[1].split()
    assert set(OPTIONS) | {"bpw<B>"} == set(options) and "tune" in options
    assert all(recipe_from_name(f"w4a8+{o}") for o in OPTIONS)  # each listed option is one a name takes


def test_inspect_reads_what_quantize_wrote(program):
    out, summary = program
    result = _run("inspect", str(out), "--json")
    data = json.loads(result.stdout)
    assert data["int_linears"] == summary["int_linears"]
    assert len(data["linears"]) == summary["int_linears"] + summary["float_linears"]
    table = _run("inspect", str(out))
    assert "language_model.layers.0.self_attn.q_proj" in table.stdout and "W4A8" in table.stdout


def test_build_dtype_auto_is_bf16_at_full_size_only():
    import argparse

    from qvla_compiler.errors import UsageError
    from qvla_compiler.preflight import build_dtype

    def args(model, dtype="auto", lerobot=None):
        return argparse.Namespace(model=model, dtype=dtype, lerobot=lerobot)

    assert [build_dtype(args(m)) for m in ("pi05-full", "groot-full", "pi05-small", "groot-tiny")] == \
        ["bf16", "bf16", "fp32", "fp32"]
    assert build_dtype(args("pi05-full", "fp32")) == "fp32" and build_dtype(args("pi05-tiny", "bf16")) == "bf16"
    assert build_dtype(args("pi05-small", lerobot="folder")) == "fp32"
    with pytest.raises(UsageError, match="drop --dtype"):
        build_dtype(args("pi05-small", "bf16", lerobot="folder"))


def test_errors_are_named_and_exit_2(tmp_path):
    result = _run("quantize", "--model", "pi07-huge", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"] == "ModelNotFoundError"
    result = _run("inspect", str(tmp_path / "nothing.pt2"))
    assert result.returncode == 2 and "ArtifactError" in result.stderr


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_compile_prints_one_line_and_leaves_no_file(sig, code, word, tmp_path):
    out = tmp_path / "p.pt2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    # as from an interactive shell: a suite started in the background (`pytest &`) ignores SIGINT, and so would the CLI
    proc = subprocess.Popen([*QVLA, "quantize", "--model", "pi05-tiny", "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # wait until the compile is under way, so the CLI's handlers are installed
        seen.append(line)
        if "built pi05-tiny" in line:
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"qvla: {word} ({sig.name}); nothing was written"
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_the_float_policy_is_freed_before_saving(monkeypatch, tmp_path, capsys):
    """At full size the float policy is gigabytes; `qvla quantize` drops it before writing the program. (A rich
    console.log in that frame once kept it alive after the `del`, through the f_locals snapshot it reads.)"""
    import gc
    import weakref

    import qvla_compiler
    from qvla_compiler import api, cli

    policies, alive_at_save = [], []
    quantize = qvla_compiler.quantize

    def spy(policy, *args, **kwargs):
        policies.append(weakref.ref(policy))
        return quantize(policy, *args, **kwargs)

    def save(self, path):
        gc.collect()
        alive_at_save.append(policies[0]() is not None)
        return path

    monkeypatch.setattr(qvla_compiler, "quantize", spy)
    monkeypatch.setattr(api.QuantizedProgram, "save", save)
    assert cli.main(["quantize", "--model", "pi05-tiny", "--recipe", "w8a8", "--calib-steps", "1",
                     "--out", str(tmp_path / "p.pt2"), "--json"]) == 0
    assert alive_at_save == [False]
