"""Episode pairs → the LIBERO result: per task, per suite and overall success (float / quantized) with 95% Wilson
intervals, the exact McNemar p-value on the paired episodes, per-chunk action divergence and end-effector
trajectory divergence. Pairs are ordered by (suite, task, episode) first, so the result does not depend on the
order the workers finished in."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from qvla_compiler.eval.stats import paired_summary

__all__ = ["summarize_pairs", "print_libero"]

_DIVERGENCE = ("action_l2", "action_rel_l2", "action_cos", "ee_mean_m", "ee_max_m", "ee_final_m")


def _success(s: dict) -> dict:
    return {"success_fp": s["rate_a"], "success_q": s["rate_b"], "ci_fp": list(s["ci_a"]), "ci_q": list(s["ci_b"]),
            "p_value": s["p_mcnemar"], "fp_only": s["a_only"], "q_only": s["b_only"], "episodes": s["n"]}


def _divergence(rows: Sequence[dict]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in _DIVERGENCE}
    out["action_l2_max"] = float(max(r["action_l2_max"] for r in rows))
    seps = [r["separation_step"] for r in rows]
    apart = [s for s in seps if s is not None]
    out["separated"] = len(apart)
    out["separation_step_median"] = float(np.median(apart)) if apart else None
    return out


def summarize_pairs(rows: Sequence[dict], suites: Sequence[str]) -> dict:
    """`rows`: EpisodePair.to_json() dicts. Returns {overall…, per_suite: {suite: {…, per_task: {id: {…}}}}}."""
    order = {s: i for i, s in enumerate(suites)}
    rows = sorted(rows, key=lambda r: (order[r["suite"]], r["task_id"], r["episode"]))

    def paired(key):
        fp = [{"family": key(r), "seed": (r["suite"], r["task_id"], r["episode"]), "success": r["success_fp"]}
              for r in rows]
        q = [{**e, "success": r["success_q"]} for e, r in zip(fp, rows)]
        return paired_summary(fp, q)

    by_task, by_suite = paired(lambda r: f"{r['suite']}/{r['task_id']}"), paired(lambda r: r["suite"])
    out = {**_success(by_suite["overall"]), **_divergence(rows), "per_suite": {}}
    for suite in suites:
        srows = [r for r in rows if r["suite"] == suite]
        if not srows:
            continue
        entry = {**_success(by_suite[suite]), **_divergence(srows), "per_task": {}}
        for tid in sorted({r["task_id"] for r in srows}):
            trows = [r for r in srows if r["task_id"] == tid]
            entry["per_task"][str(tid)] = {"task": trows[0]["task"], **_success(by_task[f"{suite}/{tid}"]),
                                           **_divergence(trows),
                                           "episodes_list": [{k: v for k, v in r.items() if k not in ("suite", "task")}
                                                             for r in trows]}
        out["per_suite"][suite] = entry
    return out


def print_libero(r: dict, console) -> None:
    """The result as rich tables: one row per task, a total per suite."""
    from rich.table import Table

    pct = "{:.0%}".format

    def ci(c):
        return f"{c[0]:.0%}–{c[1]:.0%}"

    layout = f" (layout {r['layout']})" if r["layout"] else ""
    table = Table(title=f"LIBERO · {r['policy']} · {r['recipe']}{layout} · {r['episodes_per_task']} episodes per task")
    for col in ("suite / task", "float", "95% CI", "quantized", "95% CI", "McNemar p", "chunk L2", "EE max (m)",
                "separated"):
        table.add_column(col)
    for suite, s in r["per_suite"].items():
        for tid, t in s["per_task"].items():
            table.add_row(f"{suite}/{tid} {t['task'][:40]}", pct(t["success_fp"]), ci(t["ci_fp"]), pct(t["success_q"]),
                          ci(t["ci_q"]), f"{t['p_value']:.3g}", f"{t['action_l2']:.4g}", f"{t['ee_max_m']:.4f}",
                          f"{t['separated']}/{t['episodes']}")
        table.add_row(f"[bold]{suite}[/]", pct(s["success_fp"]), ci(s["ci_fp"]), pct(s["success_q"]), ci(s["ci_q"]),
                      f"{s['p_value']:.3g}", f"{s['action_l2']:.4g}", f"{s['ee_max_m']:.4f}",
                      f"{s['separated']}/{s['episodes']}")
    console.print(table)
    console.print(f"{r['episodes']} paired episodes: float {pct(r['success_fp'])}, quantized {pct(r['success_q'])}, "
                  f"McNemar p = {r['p_value']:.3g}; {r['env_steps']} env steps, {r['seconds_per_step']:.3f} s per step, "
                  f"{r['seconds_per_episode']:.1f} s per rollout; {r['seconds']:.0f} s in all"
                  + (f"; video: {r['video']}" if r.get("video") else ""))
