"""Full-size compiles (issue 22): wall time and peak resident memory per phase, one process per run.

Each model × recipe runs `qvla quantize --json` in a fresh Python process (so one run's memory never counts against
the next) and reads its per-phase costs (qvla_compiler/inspect/phases.py: wall seconds and the kernel's peak RSS
reset at the start of each phase). The peak is set beside the policy's bf16 bytes, the issue's yardstick (≤ 1.5×).

    python benchmarks/bench_full.py --models groot-full --recipes w8a8 --calib-steps 1
    python benchmarks/bench_full.py --models pi05-full groot-full --recipes w8a8 w4a8 --save   # writes and deletes .pt2
    python benchmarks/bench_full.py --models groot-full --recipes w4a8 --save --run-loaded      # + load and run it

`--run-loaded` loads each written .pt2 in a third fresh process, as a user would (`qvla_compiler.load`), and runs one
`sample_actions` at batch 1 on the example observation saved in it: load time, run time and that process's peak RSS.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Load a saved program and run one sample_actions at batch 1 on the observation saved with it (the prefix program's
# example inputs) and the denoise program's example noise; print one JSON line.
LOADED_RUN = """
import json, resource, sys, time, torch, qvla_compiler
start = time.perf_counter()
loaded = qvla_compiler.load(sys.argv[1])
load_s = time.perf_counter() - start
eps = loaded.exported_programs
obs = [t[:1] for t in eps["prefix"].example_inputs[0]]
noise = eps["denoise"].example_inputs[0][1][:1]
policy = loaded.module(compiled=sys.argv[2] == "compiled")
start = time.perf_counter()
with torch.no_grad():
    actions = policy(*obs, noise)
run_s = time.perf_counter() - start
print(json.dumps({"load_s": round(load_s, 1), "run_s": round(run_s, 1), "actions": list(actions.shape),
                  "finite": bool(torch.isfinite(actions).all()),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))
"""


def run_loaded(path: Path, env: dict, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOADED_RUN, str(path), mode], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_one(model: str, recipe: str, calib_steps: int, save: bool, dtype: str = "auto",
            loaded: str | None = None) -> dict:
    """One `qvla quantize --json` in its own process; its JSON summary plus the wall time seen from outside; with
    `loaded` ("eager" / "compiled"), the saved program loaded and run in another."""
    with tempfile.TemporaryDirectory() as tmp:
        out = ["--out", str(Path(tmp, "program.pt2"))] if save else ["--no-save"]
        cmd = [sys.executable, "-m", "qvla_compiler.cli", "quantize", "--model", model, "--recipe", recipe,
               "--calib-steps", str(calib_steps), "--dtype", dtype, "--json", *out]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:  # -9: killed, on this box by the kernel's OOM killer; the last phase printed
            ended = [line.strip() for line in done.stderr.splitlines() if " GB resident" in line]
            return {"model": model, "recipe": recipe, "wall_s": round(wall, 1),
                    "error": f"exit {done.returncode} after {wall / 60:.1f} min; last phase ended: "
                             f"{ended[-1] if ended else 'none'}; {(done.stderr.strip().splitlines() or [''])[-1]}"}
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        if save:
            summary["saved_mb"] = round(Path(tmp, "program.pt2").stat().st_size / 1e6, 1)
        if loaded:
            summary["loaded"] = run_loaded(Path(tmp, "program.pt2"), env, loaded)
        return {**summary, "wall_s": round(wall, 1)}


def print_run(r: dict) -> None:
    if "error" in r:
        print(f"| {r['model']} | {r['recipe']} | failed: {r['error']} |||||||", flush=True)
        return
    bf16_gb = r["policy_bytes_bf16"] / 1e9
    peak = r["peak_rss_gb"]
    print(f"| {r['model']} | {r['recipe']} | {r['wall_s'] / 60:.1f} min | {peak:.2f} GB | {bf16_gb:.2f} GB | "
          f"{peak / bf16_gb:.1f}× | {r['memory_saving']:.1%} / {r['policy_memory_saving']:.1%} | "
          f"{r.get('saved_mb', '—')} | {r['action_rel_l2']:.4f} |", flush=True)
    for p in r["phases"]:
        print(f"|   | {p['name']} | {p['seconds']:.0f} s | {p['peak_rss_gb']:.2f} GB | "
              f"after {p['rss_after_gb']:.2f} GB |||||", flush=True)
    run = r.get("loaded")
    if run is not None:
        cells = (f"failed: {run['error']} |||||||" if "error" in run else
                 f"load {run['load_s']:.0f} s + run {run['run_s']:.0f} s | {run['peak_rss_gb']:.2f} GB | actions "
                 f"{run['actions']}, finite: {run['finite']} |||||")
        print(f"|   | loaded .pt2, one sample_actions at batch 1 | {cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["groot-full", "pi05-full"])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"])
    ap.add_argument("--calib-steps", type=int, default=1)
    ap.add_argument("--save", action="store_true", help="write the .pt2 (into a temporary folder) and time it")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="the float policy's build dtype (`qvla quantize --dtype`; auto: bf16 at full size)")
    ap.add_argument("--run-loaded", choices=("eager", "compiled"), help="with --save: load each .pt2 in a fresh "
                    "process and run one sample_actions at batch 1 (eager: as exported; compiled: module()'s default)")
    ap.add_argument("--json", type=Path, help="also write every run's summary here")
    args = ap.parse_args()
    import torch

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()} · "
          f"{os.cpu_count()} cores · CPU {torch.backends.cpu.get_cpu_capability()} · torch {torch.__version__} · "
          f"load {os.getloadavg()[0]:.1f} · calib steps {args.calib_steps} · build dtype {args.dtype}")
    print("| model | recipe / phase | wall | peak RSS | bf16 policy | peak / bf16 | saving (components / policy) | "
          ".pt2 MB | action rel-L2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = []
    for model in args.models:
        for recipe in args.recipes:
            runs.append(run_one(model, recipe, args.calib_steps, args.save or bool(args.run_loaded), args.dtype,
                                args.run_loaded))
            print_run(runs[-1])
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
