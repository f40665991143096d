"""What `qvla inspect` and `qvla diff` show: one data dict per saved program, rendered as a table, JSON, DOT or HTML.

`inspect_data(path)` reads a `.pt2` written by QuantizedProgram.save and returns plain JSON data:

    summary       the report's totals (bytes, saving, action fidelity) and the recipe
    linears       one row per linear: graph, module path, region, role, bits, act_scales (dynamic, static or
                  per-step ×S), rotation (the online qvla:: op on its input, if any), α (per head) / β (ATM/OHB, when present), bytes, output SQNR vs float
    graph         nodes = linears (coloured by role and bits, clustered per layer), edges = dataflow between them
                  through non-linear ops (each linear keeps its _MAX_PARENTS most recent linear producers)
    attention     the ATM/OHB record (α per head, β per block), when present
    tensors       every stored tensor (parameters, buffers, constants): sha256 of its bytes, dtype, shape and the
                  linear it belongs to, if any — what `qvla diff` compares, so changed weights never hide

A policy is stored as one program per graph (prefix, denoise step), a module as one; tensor names carry the graph
(`prefix.<name>`, `denoise.<name>`) as in format-1 files, whose one program unrolls the Euler loop (the graph then
shows each denoise linear once, not once per step).
"""
from __future__ import annotations

import hashlib
import json
import operator
import re
from pathlib import Path
from typing import Any

import torch

from qvla_compiler.kernels.ops import QVLA_LINEAR_NAMES

_MAX_PARENTS = 3
_LINEAR_OPS = {"aten.linear.default": 1, **{name: 2 for name in QVLA_LINEAR_NAMES}}  # op -> index of its weight
_ROTATION_OPS = ("qvla.hadamard", "qvla.block_rotate")
_PASS_THROUGH = ("qvla.quantize_act", "<built-in function getitem>")


def inspect_data(path: str | Path, loaded=None, trust: bool = False) -> dict[str, Any]:
    """Everything `qvla inspect` shows about one saved program (or its LoadedProgram), as JSON-ready data."""
    from qvla_compiler.api import load

    loaded = loaded or load(path, trust=trust)
    report = json.loads(loaded.report.to_json())
    # "model": the whole program (a module, or a format-1 policy whose names already start with the graph's)
    programs = {("" if name == "model" else f"{name}."): ep for name, ep in loaded.exported_programs.items()}
    rows: dict[tuple, dict] = {}
    for r in report["linears"]:  # a weight called at several sites: its first row holds the bytes
        rows.setdefault((r["graph"], r["module_path"]), dict(r))
    nodes, edges, rotation, act = _linear_graph(programs, rows)
    scales = _attention_scales(report.get("attention_scales"))
    for key, row in rows.items():
        row["rotation"] = rotation.get(key)
        row["act_scales"] = act.get(key) if row["bits"] != "float" else None
        row["alpha"], row["beta"] = scales.get(key, (None, None))
        row["cluster"] = _cluster(*key)
    linears = list(rows.values())
    summary = {k: v for k, v in report.items() if k not in ("linears", "attention_scales")}
    return {"program": str(path), "meta": loaded.meta, "summary": summary, "linears": linears,
            "graph": {"nodes": nodes, "edges": edges}, "attention": report.get("attention_scales"),
            "tensors": _tensor_digests(programs, rows), "compiled_copy": _compiled_copy(loaded.exported_programs),
            "int_linears": summary["int_linears"], "float_linears": summary["float_linears"]}


def _compiled_copy(programs: dict[str, torch.export.ExportedProgram]) -> dict[str, dict[str, int]]:
    """Per graph, what the compile paths (`module()`, `--aot`, backend="qvla") rewrite in the copy they compile."""
    from qvla_compiler.lowering.inductor_forms import rewrite_counts

    return {name: rewrite_counts(ep.module(check_guards=False)) for name, ep in programs.items()}


# ------------------------------------------------------------------------------------------------------ graph
def _linear_graph(programs: dict[str, torch.export.ExportedProgram], rows: dict) -> tuple[list, list, dict, dict]:
    """Linear nodes and the dataflow edges between them, over every program ({tensor-name prefix: program})."""
    by_state = _rows_by_state_name(rows)
    rotation: dict[tuple, str] = {}
    act: dict[tuple, str] = {}
    edges: dict[tuple, None] = {}
    carried: list = []  # what a program's outputs hold: the next one's inputs (a policy's prefix feeds its denoise)
    for prefix, ep in programs.items():
        sig = ep.graph_signature
        state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        key_of: dict[torch.fx.Node, tuple] = {}
        for node in ep.graph.nodes:
            pos = _LINEAR_OPS.get(str(node.target)) if node.op == "call_function" else None
            if pos is None or not isinstance(node.args[pos], torch.fx.Node) or node.args[pos].name not in state:
                continue
            key = by_state.get(prefix + state[node.args[pos].name])
            if key is not None:
                key_of[node] = key
                rot = _online_rotation(node.args[0])
                if rot:
                    rotation[key] = rot
                act[key] = _act_scales(node.args[1])
        from_prefix, carried = carried, _add_edges(ep, key_of, edges, carried)
    if list(programs) == ["prefix.", "denoise."]:  # Euler loop: a step's output is the next step's x_t (after KV)
        _add_edges(ep, key_of, edges, [*from_prefix, *carried, []])
    nodes = [{"id": _node_id(k), "graph": k[0], "module_path": k[1], "role": r["role"], "bits": r["bits"],
              "region": r["region"], "cluster": _cluster(*k), "sqnr_db": r.get("sqnr_db")} for k, r in rows.items()]
    return nodes, [{"source": _node_id(a), "target": _node_id(b)} for a, b in edges], rotation, act


def _add_edges(ep: torch.export.ExportedProgram, key_of: dict[torch.fx.Node, tuple], edges: dict[tuple, None],
               carried: list) -> list:
    """Each linear's _MAX_PARENTS most recent linear producers, through any non-linear ops between them; the user
    inputs start from `carried` (the previous program's user outputs, older than any node here). Returns what the
    user outputs carry."""
    graph, sig = ep.graph, ep.graph_signature
    order = {n: i for i, n in enumerate(graph.nodes)}
    user_inputs, user_outputs = set(sig.user_inputs), set(sig.user_outputs)
    inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    nearest: dict[torch.fx.Node, list[tuple[int, tuple]]] = dict(zip(inputs, carried))
    for node in graph.nodes:
        parents: dict[tuple, int] = {}
        for inp in node.all_input_nodes:
            for idx, key in ([(order[inp], key_of[inp])] if inp in key_of else nearest.get(inp, [])):
                parents[key] = max(parents.get(key, -1), idx)
        latest = sorted(((i, k) for k, i in parents.items()), reverse=True)[:_MAX_PARENTS]
        if node in key_of:
            for _, src in latest:
                if src != key_of[node]:
                    edges[(src, key_of[node])] = None
        elif node not in nearest:
            nearest[node] = latest
    outputs = [a for a in torch.utils._pytree.tree_leaves(graph.output_node().args) if isinstance(a, torch.fx.Node)]
    return [[(i - len(order), k) for i, k in ([(order[a], key_of[a])] if a in key_of else nearest.get(a, []))]
            for a in outputs if a.name in user_outputs]


def _rows_by_state_name(rows: dict) -> dict[str, tuple]:
    """Saved-program tensor names → (graph, module path): integer weights (`<graph>.qvla_<path_>_wq`) or float
    weights (`<graph>.policy.<path>.weight`; a plain module has no graph prefix)."""
    out = {}
    for graph, path, g in _homes(rows):
        flat = "qvla_" + path.replace(".", "_") + "_wq"
        for name in (f"{g}.{flat}", flat, f"{g}.policy.{path}.weight", f"{g}.{path}.weight", f"{path}.weight"):
            out.setdefault(name, (graph, path))
    return out


HOISTED_TO = {"denoise": "prefix"}  # hoist_invariants, table_time_values: step weights move there, names kept


def _homes(rows: dict) -> list[tuple[str, str, str]]:
    """(graph, path, graph whose tensors to look in): every linear's own graph first, then where it may be moved."""
    return [*((g, p, g) for g, p in rows), *((g, p, HOISTED_TO[g]) for g, p in rows if g in HOISTED_TO)]


def _tensor_digests(programs: dict[str, torch.export.ExportedProgram], rows: dict) -> dict[str, dict]:
    """name → {sha256, dtype, shape, linear}: the exact bytes of every tensor the program carries."""
    owners = _tensor_owners(rows)
    out = {}
    tensors = {prefix + name: t for prefix, ep in programs.items()
               for name, t in {**ep.state_dict, **ep.constants}.items()}
    for name, t in sorted(tensors.items()):
        if not isinstance(t, torch.Tensor):
            continue
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        owner = next((key for prefix, key in owners if name.startswith(prefix)), None)
        out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "dtype": str(t.dtype).replace("torch.", ""),
                     "shape": list(t.shape), "linear": None if owner is None else f"{owner[0]}:{owner[1]}"}
    return out


def _tensor_owners(rows: dict) -> list[tuple[str, tuple]]:
    """Name prefixes of each linear's tensors (integer `qvla_<path_>_wq/_ws/_xs`, float `<path>.weight/.bias`),
    longest first so `layers.1` never claims `layers.10`'s tensors."""
    prefixes = {}
    for graph, path, g in _homes(rows):
        flat = "qvla_" + path.replace(".", "_") + "_"
        for prefix in (f"{g}.{flat}", flat, f"{g}.policy.{path}.", f"{g}.{path}.", f"{path}."):
            prefixes.setdefault(prefix, (graph, path))
    return sorted(prefixes.items(), key=lambda p: -len(p[0]))


def _act_scales(xs: torch.fx.Node) -> str:
    """How the activation scale reaching an integer linear is set: "dynamic" (per token), "static", or "per-step ×S"
    (a qvla::step_scale gather from a table of S calibrated scales)."""
    quant = xs.args[0] if xs.target is operator.getitem and xs.args else None
    if quant is None or not str(quant.target).startswith("qvla.quantize_act"):
        return "?"
    static = quant.args[2] if len(quant.args) > 2 else quant.kwargs.get("static_scale")
    if static is None:
        return "dynamic"
    if str(getattr(static, "target", "")).startswith("qvla.step_scale"):
        table = static.args[0]
        val = table.meta.get("val") if isinstance(table, torch.fx.Node) else None
        return f"per-step ×{val.shape[0]}" if val is not None else "per-step"
    return "static"


def _online_rotation(x: torch.fx.Node) -> str | None:
    """The qvla:: rotation op feeding a linear's input (through quantize_act / getitem), if any."""
    for _ in range(4):
        target = str(x.target)
        if target.startswith(_ROTATION_OPS):
            return target.split(".")[1]
        if not target.startswith(_PASS_THROUGH) or not x.args or not isinstance(x.args[0], torch.fx.Node):
            return None
        x = x.args[0]
    return None


def _cluster(graph: str, path: str) -> str:
    """`language_model.layers.3.mlp.up` → `prefix:language_model.layers.3`; modules outside layers by first name."""
    m = re.match(r"(.*?\.\d+)(\.|$)", path)
    return f"{graph}:{m.group(1) if m else path.split('.')[0]}"


def _node_id(key: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{key[0]}__{key[1]}")


def _attention_scales(record: dict | None) -> dict[tuple, tuple]:
    """(graph, module path) → (α per head for q projections, β for o projections) from the ATM/OHB record."""
    out: dict[tuple, tuple] = {}
    for graph, sites in ((record or {}).get("graphs") or {}).items():
        for site in sites:
            for path in site.get("q_proj", []):
                out[(graph, path)] = (site.get("alpha"), out.get((graph, path), (None, None))[1])
            for path in site.get("o_proj", []):
                out[(graph, path)] = (out.get((graph, path), (None, None))[0], site.get("beta"))
    return out


# ------------------------------------------------------------------------------------------------------ DOT
_ROLE_COLOURS = {"attn_q": "#4e79a7", "attn_k": "#76b7b2", "attn_v": "#59a14f", "attn_o": "#edc948",
                 "attn_qkv": "#86bcb6", "attn_kv": "#86bcb6", "mlp": "#f28e2b", "other": "#bab0ac"}
_BITS_COLOURS = {"float": "#9e9e9e", "W8A8": "#1f5fbf", "W4A8": "#c2185b", "W4A4": "#6a1b9a", "W8A4": "#00897b",
                 "W3A8": "#e65100", "W3A4": "#bf360c", "W2A8": "#827717", "W2A4": "#33691e"}


def render_dot(data: dict) -> str:
    """Graphviz source: one cluster per layer, nodes filled by role, outlined by bits (dashed = float)."""
    lines = ["digraph qvla {", '  rankdir=LR; node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             f'  label="{_esc(data["program"])}: {data["summary"]["recipe"]} · layout {data["summary"]["layout"]}";']
    clusters: dict[str, list] = {}
    for n in data["graph"]["nodes"]:
        clusters.setdefault(n["cluster"], []).append(n)
    for i, (name, nodes) in enumerate(clusters.items()):
        lines.append(f'  subgraph cluster_{i} {{ label="{_esc(name)}"; style=rounded; color="#cccccc";')
        for n in nodes:
            q = n["bits"] != "float"
            sq = "" if n["sqnr_db"] is None else f'\\n{n["sqnr_db"]} dB'
            style = '"rounded,filled"' if q else '"rounded,filled,dashed"'
            lines.append(f'    {n["id"]} [label="{_esc(n["module_path"].split(".")[-1])}\\n{n["bits"]}{sq}", '
                         f'fillcolor="{_ROLE_COLOURS.get(n["role"], "#ffffff")}", '
                         f'color="{_BITS_COLOURS.get(n["bits"], "#000000")}", penwidth={2.5 if q else 1}, '
                         f'style={style}, tooltip="{_esc(n["module_path"])} ({n["role"]}, {n["region"]})"];')
        lines.append("  }")
    lines += [f'  {e["source"]} -> {e["target"]};' for e in data["graph"]["edges"]]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


# ------------------------------------------------------------------------------------------------------ diff
_ROW_FIELDS = ("region", "role", "bits", "act_scales", "rotation", "bytes_quant", "sqnr_db", "alpha", "beta")
_SUMMARY_FIELDS = ("model", "recipe", "layout", "int_linears", "float_linears", "bytes_bf16", "bytes_quant",
                   "memory_saving", "policy_bytes_quant", "policy_memory_saving", "action_rel_l2", "action_sqnr_db")


def diff_data(a: dict, b: dict) -> dict:
    """What changed from program `a` to program `b`: totals, the recipe, and every linear that differs."""
    rows_a = {(r["graph"], r["module_path"]): r for r in a["linears"]}
    rows_b = {(r["graph"], r["module_path"]): r for r in b["linears"]}
    changed = []
    for key in [k for k in rows_a if k in rows_b]:
        fields = {f: [rows_a[key].get(f), rows_b[key].get(f)] for f in _ROW_FIELDS
                  if rows_a[key].get(f) != rows_b[key].get(f)}
        if fields:
            changed.append({"graph": key[0], "module_path": key[1], "changes": fields})
    summary = {f: [a["summary"].get(f), b["summary"].get(f)] for f in _SUMMARY_FIELDS
               if a["summary"].get(f) != b["summary"].get(f)}
    ra, rb = a["meta"].get("recipe", {}), b["meta"].get("recipe", {})
    recipe = {k: [ra.get(k), rb.get(k)] for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)}
    tensors = diff_tensors(a.get("tensors", {}), b.get("tensors", {}))
    return {"a": a["program"], "b": b["program"], "summary": summary, "recipe": recipe, "linears": changed,
            "tensors": tensors,
            "only_in_a": [f"{g}:{p}" for g, p in rows_a if (g, p) not in rows_b],
            "only_in_b": [f"{g}:{p}" for g, p in rows_b if (g, p) not in rows_a],
            "identical": not (summary or recipe or changed or any(tensors.values()))
            and rows_a.keys() == rows_b.keys()}


def diff_tensors(a: dict, b: dict) -> dict[str, list]:
    """Stored tensors whose bytes, dtype or shape differ, and those only one program has."""
    changed = [{"name": n, "linear": a[n]["linear"], "what": [k for k in ("dtype", "shape", "sha256")
                                                              if a[n][k] != b[n][k]]}
               for n in sorted(a.keys() & b.keys()) if a[n] != b[n]]
    return {"changed": changed, "only_in_a": sorted(a.keys() - b.keys()), "only_in_b": sorted(b.keys() - a.keys())}


def fmt_scale(alpha, beta) -> str:
    """α as mean [min, max] over heads, β as a number; '' when neither is present."""
    parts = []
    if alpha:
        parts.append(f"α {sum(alpha) / len(alpha):.3f} [{min(alpha):.2f}, {max(alpha):.2f}]")
    if beta is not None:
        parts.append(f"β {beta:.3f}")
    return " ".join(parts)
