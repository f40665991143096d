"""`qvla inspect` (table, --json, --dot, --html in a real headless browser) and `qvla diff` on saved programs."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from policy_fixtures import quantized_policy
from qvla_compiler.inspect.html import render_html
from qvla_compiler.inspect.summary import _attention_scales, diff_data, inspect_data, render_dot

QVLA = [sys.executable, "-m", "qvla_compiler.cli"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    paths = {}
    for name, recipe in (("pi05-tiny", "w4a8"), ("groot-tiny", "w8a8")):
        paths[name] = quantized_policy(name, recipe)[1].save(out / f"{name}.pt2")
    return paths


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_inspect_data_covers_every_linear_with_graph_and_clusters(programs, name):
    data = inspect_data(programs[name])
    _, qp = quantized_policy(name, "w4a8" if name == "pi05-tiny" else "w8a8")
    assert len(data["linears"]) == len(qp.report.linears) == len(data["graph"]["nodes"])
    assert sum(n["bits"] != "float" for n in data["graph"]["nodes"]) == qp.report.int_linears
    assert len(data["graph"]["edges"]) >= len(data["linears"]) - 10  # connected dataflow, not isolated boxes
    ids = {n["id"] for n in data["graph"]["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in data["graph"]["edges"])
    assert any(c.endswith("layers.0") for c in {n["cluster"] for n in data["graph"]["nodes"]})
    dot = render_dot(data)
    assert dot.startswith("digraph qvla {") and dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == len({n["cluster"] for n in data["graph"]["nodes"]})
    assert len(re.findall(r" -> ", dot)) == len(data["graph"]["edges"])


def test_html_is_self_contained(programs):
    page = render_html(inspect_data(programs["pi05-tiny"]))
    assert "<link" not in page and not re.search(r"\s(src|href)=", page)
    assert re.findall(r"https?://[^\s'\"]+", page) == ["http://www.w3.org/2000/svg"]  # an XML namespace, not a fetch


def test_html_renders_in_a_headless_browser(programs, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser installed (apt-get install chromium); the HTML page is not browser-checked")
    data = inspect_data(programs["pi05-tiny"])
    page = tmp_path / "report.html"
    page.write_text(render_html(data), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    status = re.search(r'<div id="qvla-status"([^>]*)>([^<]*)', dom)
    assert status, dom[-2000:]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', status.group(1)))
    assert attrs["data-errors"] == "0", status.group(2)
    assert int(attrs["data-quantized"]) == data["int_linears"] == 20
    assert int(attrs["data-nodes"]) == len(data["linears"])
    assert dom.count('class="bar"') == 4  # SQNR bars: 2 backbone layers + 2 action-expert layers hold integer linears


def test_cli_inspect_writes_json_html_dot_and_diff(programs, tmp_path):
    res = subprocess.run([*QVLA, "inspect", str(programs["pi05-tiny"]), "--html", str(tmp_path / "r.html"),
                          "--dot", str(tmp_path / "r.dot"), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["int_linears"] == 20 and len(data["graph"]["nodes"]) == 50
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r.dot").read_text().startswith("digraph")
    table = subprocess.run([*QVLA, "inspect", str(programs["groot-tiny"])], capture_output=True, text=True,
                           timeout=600)
    assert table.returncode == 0 and "rotation" in table.stdout and "SQNR dB" in table.stdout
    diff = subprocess.run([*QVLA, "diff", str(programs["pi05-tiny"]), str(programs["pi05-tiny"]), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert json.loads(diff.stdout)["identical"] is True


def test_diff_names_what_changed(programs):
    a, b = inspect_data(programs["pi05-tiny"]), inspect_data(programs["groot-tiny"])
    d = diff_data(a, b)
    assert not d["identical"] and d["summary"]["model"] == ["pi05-tiny", "groot-tiny"]
    assert d["recipe"]["w_bits"] == [4, 8] and d["only_in_a"] and d["only_in_b"]
    same = diff_data(a, a)
    assert same["identical"] and not same["linears"]


def test_attention_scales_map_alpha_to_q_and_beta_to_o():
    record = {"graphs": {"prefix": [{"block": 0, "q_proj": ["l.0.q"], "o_proj": ["l.0.o"], "alpha": [1.1, 0.9],
                                     "beta": 0.95}]}}
    scales = _attention_scales(record)
    assert scales[("prefix", "l.0.q")] == ([1.1, 0.9], None)
    assert scales[("prefix", "l.0.o")] == (None, 0.95)


def test_phases_are_traced_to_files_and_torch_trace(tmp_path):
    code = ("import torch, torch.fx as fx; from qvla_compiler.inspect.trace import trace_phase; "
            "gm = fx.symbolic_trace(torch.nn.Linear(4, 3)); "
            f"trace_phase('1-analysed', {{'forward': gm}}, {str(tmp_path / 'dump')!r})")
    env = {**__import__("os").environ, "TORCH_TRACE": str(tmp_path / "trace")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "linear" in (tmp_path / "dump" / "1-analysed-forward.py").read_text()
    logs = "".join(p.read_text() for p in (tmp_path / "trace").iterdir())
    assert '"name": "qvla_1-analysed_forward"' in logs


def test_inspect_finds_the_weights_hoisted_into_the_prefix(programs):
    """hoist_invariants moves GR00T's cross-attention K/V projections into the prefix, their tensor names kept."""
    data = inspect_data(programs["groot-tiny"])
    moved = {n: t for n, t in data["tensors"].items() if n.startswith("prefix.") and ".attn1.to_k." in n}
    assert moved and all(t["linear"].startswith("denoise:") for t in moved.values()), moved
    assert all(r["act_scales"] for r in data["linears"] if r["bits"] != "float")


def test_inspect_says_what_the_compiled_copy_rewrites(programs):
    """Per graph, the rewrites `module()` / `--aot` compile (lowering/inductor_forms.py): pi0.5's explicit softmax
    attention fused and folded over its one key/value head; its vision tower's unmasked softmaxes left as written."""
    pi05 = inspect_data(programs["pi05-tiny"])["compiled_copy"]
    assert {k: v for k, v in pi05["denoise"].items() if k != "precompute_factories"} == {
        "fuse_attention": 2, "fold_shared_kv": 2, "gelu_as_sigmoid": 2, "transpose_float_weights": 10,
        "patch_convs_as_gemms": 0, "sdpa": 2, "softmax_left": 0}
    assert pi05["prefix"]["patch_convs_as_gemms"] == 1  # the vision tower's patch embedding
    assert pi05["prefix"]["precompute_factories"] >= 1  # the time MLP's frequencies, at least
    assert pi05["prefix"]["fuse_attention"] == 2 and pi05["prefix"]["softmax_left"] == 2
    groot = inspect_data(programs["groot-tiny"])["compiled_copy"]
    assert groot["prefix"]["fold_shared_kv"] == 2 and groot["denoise"]["sdpa"] == 4  # GR00T writes SDPA itself
