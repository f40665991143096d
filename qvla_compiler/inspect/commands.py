"""`qvla inspect` and `qvla diff`: tables on the terminal, --json / --html / --dot files (see inspect.summary)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from qvla_compiler.inspect.summary import diff_data, fmt_scale, inspect_data, render_dot

_NUMERIC = ("params", "KiB bf16", "KiB now", "SQNR dB")


def run_inspect(args, console, print_summary) -> int:
    data = inspect_data(args.program, trust=args.trust)
    written = []
    if getattr(args, "html", None):
        from qvla_compiler.inspect.html import render_html

        Path(args.html).write_text(render_html(data), encoding="utf-8")
        written.append(args.html)
    if getattr(args, "dot", None):
        Path(args.dot).write_text(render_dot(data), encoding="utf-8")
        written.append(args.dot)
    if args.json:
        print(json.dumps(data, default=str))
        return 0
    s = data["summary"]
    table = Table(title=f"{args.program}: {s['model']} · {s['recipe']} · layout {s['layout']}")
    for col in ("graph", "module path", "region", "role", "bits", "act", "rotation", "α/β", "params", "KiB bf16", "KiB now",
                "SQNR dB"):
        table.add_column(col, justify="right" if col in _NUMERIC else "left")
    for r in data["linears"]:
        sq = "" if r["sqnr_db"] is None else str(r["sqnr_db"])
        table.add_row(r["graph"], r["module_path"], r["region"], r["role"], r["bits"], r.get("act_scales") or "",
                      r["rotation"] or "",
                      fmt_scale(r["alpha"], r["beta"]), f"{r['params']:,}", f"{r['bytes_bf16'] / 1024:.1f}",
                      f"{r['bytes_quant'] / 1024:.1f}", sq)
    console.print(table)
    for graph, n in data["compiled_copy"].items():  # what module() / --aot / backend="qvla" compile instead
        console.print(f"compiled copy, {graph}: {n['sdpa']} attention(s) as one SDPA ({n['fuse_attention']} fused "
                      f"from explicit softmax, {n['fold_shared_kv']} over shared key/value heads), "
                      f"{n['gelu_as_sigmoid']} tanh GELU(s) as x·sigmoid, {n['precompute_factories']} static "
                      f"tensor(s) as constants, {n['transpose_float_weights']} float linear(s) on [K, N] weights, "
                      f"{n['patch_convs_as_gemms']} patch convolution(s) as one GEMM, "
                      f"{n['softmax_left']} softmax(es) left as written (a form no rewrite "
                      "takes, or not attention)")
    print_summary({**s, "out": None})
    for path in written:
        console.print(f"wrote {path}")
    return 0


def run_diff(args, console) -> int:
    from qvla_compiler.api import load

    loaded = [load(args.a, trust=args.trust), load(args.b, trust=args.trust)]  # both load before either is analysed
    diff = diff_data(inspect_data(args.a, loaded[0]), inspect_data(args.b, loaded[1]))
    if args.json:
        print(json.dumps(diff, default=str))
        return 0
    if diff["identical"]:
        console.print(f"{args.a} and {args.b}: same recipe, same decisions, same numbers, identical tensors")
        return 0
    totals = Table(title=f"{args.a} → {args.b}")
    for col in ("", "A", "B"):
        totals.add_column(col)
    for key, (a, b) in {**{f"recipe.{k}": v for k, v in diff["recipe"].items()}, **diff["summary"]}.items():
        totals.add_row(key, str(a), str(b))
    console.print(totals)
    if diff["linears"]:
        table = Table(title=f"{len(diff['linears'])} linears changed")
        for col in ("graph", "module path", "field", "A", "B"):
            table.add_column(col)
        for row in diff["linears"]:
            for i, (field, (a, b)) in enumerate(row["changes"].items()):
                table.add_row(row["graph"] if i == 0 else "", row["module_path"] if i == 0 else "", field, str(a),
                              str(b))
        console.print(table)
    for side in ("only_in_a", "only_in_b"):
        if diff[side]:
            console.print(f"{side.replace('_', ' ')}: {', '.join(diff[side])}")
    _print_tensor_diff(diff["tensors"], console)
    return 0


def _print_tensor_diff(tensors: dict, console) -> None:
    if tensors["changed"]:
        table = Table(title=f"{len(tensors['changed'])} stored tensors differ")
        for col in ("tensor", "linear", "differs in"):
            table.add_column(col)
        for row in tensors["changed"]:
            what = ", ".join("values" if w == "sha256" else w for w in row["what"])
            table.add_row(row["name"], row["linear"] or "", what)
        console.print(table)
    for side in ("only_in_a", "only_in_b"):
        if tensors[side]:
            console.print(f"tensors {side.replace('_', ' ')}: {', '.join(tensors[side])}")
