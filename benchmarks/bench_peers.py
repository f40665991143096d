"""CPU latency of qvla integer programs against their peers, in one process, interleaved rounds.

Variants (each skipped with its reason when it cannot run here, e.g. torchao not installed):
  fp32 eager                     the float policy as written
  fp32 inductor                  torch.compile + freezing (weights become prepacked constants)
  bf16 inductor                  the policy cast to bf16 (inputs too), torch.compile + freezing
  torchao w8a8 [inductor]        torchao Int8DynamicActivationInt8WeightConfig on every linear, eager / compiled
  pt2e x86 inductor              torchao PT2E X86InductorQuantizer static config, calibrated, compile + freezing
  qvla w8a8 / w4a8               the lowered program (qvla:: ops, as saved in the .pt2), eager; sample = the loaded
                                 .pt2's module (`qvla_compiler.load(path).module()`)
  qvla w8a8 / w4a8 inductor      the same graphs through `kernels.inductor.compile_program` (qvla:: ops decomposed
                                 for Inductor, freezing); sample = the Euler loop over the compiled prefix and step
  qvla w8a8[+all][+bf16] aot,   the AOTInductor package (`qvla quantize --aot`) as loaded: native prefix and step,
  qvla w4a8 aot                  no Dynamo guards; sample = the loaded package's module()

Parts: prefix (embed_prefix), denoise (one denoise step on the variant's own prefix), sample (whole sample_actions:
prefix + every step). Each round times every variant once per part (adaptive inner repeats), in a fixed order;
medians and quartiles over the rounds. Beside each row: action rel-L2 vs fp32 eager (same noise) and stored weight
bytes. The header prints date, CPU, capability, the integer GEMM backend and load averages.

    python benchmarks/bench_peers.py [--models pi05-small groot-small] [--batches 1 8] [--rounds 15]
        [--threads 1] [--variants ...] [--parts prefix denoise sample] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import qvla_compiler
from qvla_compiler.kernels import cpu_gemm
from qvla_compiler.kernels.inductor import compile_program
from qvla_compiler.models import build_policy
from qvla_compiler.models.sampling import euler_sample

warnings.filterwarnings("ignore")
# qvla's default layout keeps the action head's attention and the vision tower float; the peers quantize every
# linear: "+all" makes every linear integer, "+bf16" runs the float linears in bf16 (native on AVX512-BF16 / AMX)
QVLA_OPTIONS = ("w8a8+all", "w8a8+bf16", "w8a8+all+bf16")
AOT_RECIPES = ("w8a8", "w4a8", "w8a8+bf16", "w8a8+all", "w8a8+all+bf16")
ALL_VARIANTS = ("fp32 eager", "fp32 inductor", "bf16 inductor", "torchao w8a8", "torchao w8a8 inductor",
                "pt2e x86 inductor", "qvla w8a8", "qvla w8a8 inductor", "qvla w4a8", "qvla w4a8 inductor",
                *(f"qvla {r} inductor" for r in QVLA_OPTIONS), *(f"qvla {r} aot" for r in AOT_RECIPES))
OBS_KEYS = ("images", "tokens", "token_mask", "state")


@dataclass
class Variant:
    name: str
    prefix: Callable  # obs dict -> prefix tuple
    denoise: Callable  # (prefix, x, t) -> velocity
    sample: Callable  # (obs, noise) -> actions
    weight_bytes: int
    build_s: float = 0.0
    note: str = ""
    times: dict = field(default_factory=dict)
    rel_l2: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
           if f in flags]
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "cpu": model, "cores": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "qvla_int_gemm": cpu_gemm.backend(),
            "quantized_engine": torch.backends.quantized.engine, "mkldnn": torch.backends.mkldnn.is_available(),
            "threads": threads, "torchao": _torchao_version()}


def _torchao_version() -> str | None:
    try:
        import torchao
    except Exception:  # noqa: BLE001 - optional peer
        return None
    return torchao.__version__


# ---------------------------------------------------------------------------------------------------------------
# weight bytes
# ---------------------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> int:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def tensors_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def module_bytes(m: torch.nn.Module) -> int:
    tensors = [*m.parameters(), *m.buffers()]
    if isinstance(m, torch.fx.GraphModule):  # get_attr constants (PT2E folds int8 weights into plain attributes)
        for node in m.graph.nodes:
            if node.op == "get_attr":
                obj = m
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                tensors.append(obj)
    return tensors_bytes(tensors)


# ---------------------------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------------------------
class _Fn(torch.nn.Module):
    """A policy method as a module (for export / compile): prefix(images, tokens, token_mask, state) or
    denoise(*prefix, x, t)."""

    def __init__(self, policy, part: str, n_prefix: int = 0):
        super().__init__()
        self.policy, self.part, self.n_prefix = policy, part, n_prefix

    def forward(self, *args):
        if self.part == "prefix":
            return tuple(self.policy.embed_prefix(*args))
        return self.policy.denoise_step(tuple(args[:self.n_prefix]), args[self.n_prefix], args[self.n_prefix + 1])


def _obs_args(obs):
    return tuple(obs[k] for k in OBS_KEYS)


def _from_modules(name, prefix_m, denoise_m, schedule, weight_bytes, cast=None, note="") -> Variant:
    """A variant from a prefix module (obs tensors -> prefix tuple) and a denoise module (*prefix, x, t -> v)."""
    cast = cast or (lambda t: t)

    def prefix(obs):
        return tuple(prefix_m(*(cast(o) for o in _obs_args(obs))))

    def denoise(pre, x, t):
        return denoise_m(*pre, cast(x), cast(t)).float()

    def sample(obs, noise):
        return euler_sample(lambda **o: prefix(o), denoise, obs, noise, schedule)

    return Variant(name, prefix, denoise, sample, weight_bytes, note=note)


def _probe_args(policy, obs, noise):
    with torch.no_grad():
        pre = tuple(policy.embed_prefix(**obs))
    t = torch.full((noise.shape[0],), float(policy.schedule.timesteps[0]))
    return pre, t


def build_fp32_eager(policy, obs, noise, ctx):
    return Variant("fp32 eager", lambda o: tuple(policy.embed_prefix(**o)),
                   lambda pre, x, t: policy.denoise_step(pre, x, t),
                   lambda o, n: policy.sample_actions(**o, noise=n), module_bytes(policy))


def build_fp32_inductor(policy, obs, noise, ctx):
    pre, _ = _probe_args(policy, obs, noise)
    pm = compile_program(_Fn(policy, "prefix"))
    dm = compile_program(_Fn(policy, "denoise", len(pre)))
    return _from_modules("fp32 inductor", pm, dm, policy.schedule, module_bytes(policy),
                         note="freezing: resident weights are prepacked fp32 copies")


def build_bf16_inductor(policy, obs, noise, ctx):
    bf = copy.deepcopy(policy).to(torch.bfloat16)
    pre, _ = _probe_args(policy, obs, noise)

    def cast(t):
        return t.to(torch.bfloat16) if t.is_floating_point() else t

    pm = compile_program(_Fn(bf, "prefix"))
    dm = compile_program(_Fn(bf, "denoise", len(pre)))
    return _from_modules("bf16 inductor", pm, dm, policy.schedule, module_bytes(bf), cast=cast,
                         note="whole policy cast to bf16")


def _torchao_quantized(policy):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    q = copy.deepcopy(policy)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    return q


def build_torchao(policy, obs, noise, ctx):
    q = ctx.setdefault("torchao", _torchao_quantized(policy))
    return Variant("torchao w8a8", lambda o: tuple(q.embed_prefix(**o)), lambda pre, x, t: q.denoise_step(pre, x, t),
                   lambda o, n: q.sample_actions(**o, noise=n), module_bytes(q), note="every linear W8A8 dynamic")


def build_torchao_inductor(policy, obs, noise, ctx):
    q = ctx.setdefault("torchao", _torchao_quantized(policy))
    pre, _ = _probe_args(policy, obs, noise)
    pm = compile_program(_Fn(q, "prefix"))
    dm = compile_program(_Fn(q, "denoise", len(pre)))
    return _from_modules("torchao w8a8 inductor", pm, dm, policy.schedule, module_bytes(q),
                         note="every linear W8A8 dynamic")


def build_pt2e(policy, obs, noise, ctx, calib: int = 4):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    batch = noise.shape[0]
    pre, t = _probe_args(policy, obs, noise)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=False))
    batches = list(policy.calibration_batches(calib, seed=1, batch=batch))
    gen = torch.Generator().manual_seed(1)
    modules, nbytes = [], 0
    for part, example, calib_args in (
            ("prefix", _obs_args(obs), [_obs_args(b) for b in batches]),
            ("denoise", (*pre, noise, t), [(*_probe_args(policy, b, noise)[0],
                                            torch.randn(noise.shape, generator=gen),
                                            torch.full((batch,), float(ts))) for b, ts in
                                           zip(batches, policy.schedule.timesteps)])):
        fn = _Fn(policy, part, len(pre))
        with torch.no_grad():
            gm = torch.export.export(fn, example, strict=False).module()
            prepared = prepare_pt2e(gm, quantizer)
            for args in calib_args:
                prepared(*args)
            converted = convert_pt2e(prepared)
        nbytes += module_bytes(converted)
        modules.append(compile_program(converted))
    return _from_modules("pt2e x86 inductor", modules[0], modules[1], policy.schedule, nbytes,
                         note=f"static per-tensor u8 activations, {calib} calibration batches; weight bytes = "
                              "prefix graph + denoise graph (a weight both read counts twice)")


def _qvla_program(policy, name, recipe, ctx):
    key = f"qvla {recipe}"
    if key not in ctx:
        qp = qvla_compiler.quantize(policy, policy.example_inputs(2), recipe=recipe, progress=False, model_name=name)
        path = os.path.join(ctx["tmp"], f"{name}-{recipe}.pt2")
        qp.save(path)
        loaded = qvla_compiler.load(path)
        ctx[key] = (qp, loaded, os.path.getsize(path))
    return ctx[key]


def _ep_bytes(ep) -> int:
    return tensors_bytes([*ep.state_dict.values(), *ep.constants.values()])


def build_qvla(recipe: str, compiled: bool):
    def build(policy, obs, noise, ctx):
        qp, loaded, file_bytes = _qvla_program(policy, ctx["model"], recipe, ctx)
        graphs = qp.program.graphs
        label = f"qvla {recipe}" + (" inductor" if compiled else "")
        nbytes = sum(_ep_bytes(ep) for ep in loaded.exported_programs.values())
        if compiled:
            step = compile_program(graphs["denoise"])  # the graph itself, as module() compiles it (its rewrites)
            return _from_modules(label, compile_program(graphs["prefix"]),
                                 lambda *a: step(tuple(a[:-2]), a[-2], a[-1]),
                                 policy.schedule, nbytes,
                                 note="qvla:: ops decomposed for Inductor, freezing; sample = Euler loop")
        whole = loaded.module()
        return Variant(label, lambda o: tuple(graphs["prefix"](*_obs_args(o))),
                       lambda pre, x, t: graphs["denoise"](tuple(pre), x, t),
                       lambda o, n: whole(*_obs_args(o), n), nbytes,
                       note=f"sample = load(.pt2).module() ({file_bytes / 2**20:.1f} MiB file)")
    return build


def build_qvla_aot(recipe: str):
    def build(policy, obs, noise, ctx):
        qp, plain, _ = _qvla_program(policy, ctx["model"], recipe, ctx)
        path = os.path.join(ctx["tmp"], f"{ctx['model']}-{recipe}.aoti.pt2")
        qp.save_aot(path)
        loaded = qvla_compiler.load(path, trust=True)  # we wrote it: its native code is ours
        run, whole = loaded.aoti_runners, loaded.module()
        nbytes = sum(_ep_bytes(ep) for ep in plain.exported_programs.values())  # the weights the package holds
        return Variant(f"qvla {recipe} aot", lambda o: tuple(run["prefix"](*_obs_args(o))),
                       lambda pre, x, t: run["denoise"](tuple(pre), x, t), lambda o, n: whole(*_obs_args(o), n),
                       nbytes, note=f"AOTInductor package as loaded ({os.path.getsize(path) / 2**20:.1f} MiB file)")
    return build


BUILDERS = {"fp32 eager": build_fp32_eager, "fp32 inductor": build_fp32_inductor,
            "bf16 inductor": build_bf16_inductor, "torchao w8a8": build_torchao,
            "torchao w8a8 inductor": build_torchao_inductor, "pt2e x86 inductor": build_pt2e,
            "qvla w8a8": build_qvla("w8a8", False), "qvla w8a8 inductor": build_qvla("w8a8", True),
            "qvla w4a8": build_qvla("w4a8", False), "qvla w4a8 inductor": build_qvla("w4a8", True),
            **{f"qvla {r} inductor": build_qvla(r, True) for r in QVLA_OPTIONS},
            **{f"qvla {r} aot": build_qvla_aot(r) for r in AOT_RECIPES}}


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
def _calls(v: Variant, part: str, obs, noise, t):
    if part == "prefix":
        return lambda: v.prefix(obs)
    if part == "denoise":
        pre = v.prefix(obs)
        return lambda: v.denoise(pre, noise, t)
    return lambda: v.sample(obs, noise)


def time_part(variants: list[Variant], part: str, obs, noise, t, rounds: int, min_ms: float) -> None:
    calls = {}
    with torch.no_grad():
        for v in variants:
            fn = _calls(v, part, obs, noise, t)
            fn()  # warm (compiles, if not yet)
            start = time.perf_counter()
            fn()
            once = (time.perf_counter() - start) * 1e3
            calls[v.name] = (fn, max(1, int(min_ms / max(once, 1e-3))))
        load = [os.getloadavg()[0]]
        samples = {v.name: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                fn, inner = calls[v.name]
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[v.name].append((time.perf_counter() - start) * 1e3 / inner)
        load.append(os.getloadavg()[0])
    for v in variants:
        s = sorted(samples[v.name])
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        v.times[part] = {"median": statistics.median(s), "q1": q[0], "q3": q[2], "load": load}


def bench(model: str, batch: int, names: list[str], parts: list[str], rounds: int, min_ms: float, ctx: dict):
    policy = build_policy(model).eval()
    obs, noise = policy.example_inputs(batch), policy.example_noise(batch)
    t = torch.full((batch,), float(policy.schedule.timesteps[0]))
    ctx["model"] = model
    with torch.no_grad():
        ref = policy.sample_actions(**obs, noise=noise)
    variants, skipped = [], {}
    for name in names:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                v = BUILDERS[name](policy, obs, noise, ctx)
                actions = v.sample(obs, noise)  # first call: compiles prefix and step
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if os.environ.get("QVLA_BENCH_DEBUG"):
                traceback.print_exc()
            continue
        v.build_s = time.perf_counter() - start
        v.rel_l2 = float((actions.float() - ref).norm() / ref.norm())
        variants.append(v)
        print(f"  built {name} in {v.build_s:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    for part in parts:
        time_part(variants, part, obs, noise, t, rounds, min_ms)
    return variants, skipped


def print_table(model: str, batch: int, variants: list[Variant], skipped: dict, parts: list[str]) -> None:
    base = variants[0].times if variants and variants[0].name == "fp32 eager" else None
    print(f"\n### {model}, batch {batch} (ms: median [q1–q3]; × = median / fp32 eager median)\n")
    head = " | ".join(f"{p} ms | {p} ×" for p in parts)
    print(f"| variant | {head} | action rel-L2 | weight MiB | build s | load (1-min) |")
    print("|---|" + "---|---|" * len(parts) + "---|---|---|---|")
    for v in variants:
        cells = []
        for p in parts:
            r = v.times[p]
            ratio = f"{r['median'] / base[p]['median']:.2f}×" if base else "–"
            cells.append(f"{r['median']:.2f} [{r['q1']:.2f}–{r['q3']:.2f}] | {ratio}")
        loads = [x for p in parts for x in v.times[p]["load"]]
        print(f"| {v.name} | {' | '.join(cells)} | {v.rel_l2:.2e} | {v.weight_bytes / 2**20:.2f} | "
              f"{v.build_s:.0f} | {min(loads):.1f}–{max(loads):.1f} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} |")
    for v in variants:
        if v.note:
            print(f"- {v.name}: {v.note}")


def bench_int8_gemms(rounds: int) -> None:
    """Why the AVX2 integer GEMM is the exact fp32 one: per-GEMM times of every exact int8 candidate on this CPU.

    u8s8 kernels (fbgemm, oneDNN) multiply with vpmaddubsw on AVX2, whose int16 pair sums saturate at full 8-bit
    range; the activation split a = max(a, 0) - max(-a, 0) (two 7-bit halves) makes them exact at two GEMMs."""
    torch.backends.quantized.engine = "fbgemm"
    fq = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    print("\n### exact int8 GEMM candidates, int8 [M, K] x [N, K]^T (ms: median of interleaved rounds)\n")
    print("| M×K×N | fp32 GEMM | qvla fp32_exact (cached fp32 weight) | torch._int_mm | fbgemm u8s8 one call (full range: "
          "max error) | fbgemm 7-bit split, 2 calls (max error) | oneDNN 7-bit split, 2 calls (max error) | load |")
    print("|---|---|---|---|---|---|---|---|")
    for m, k, n in [(50, 256, 1024), (50, 512, 2048), (50, 2048, 512), (200, 256, 1024), (1, 512, 2048)]:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        xf, wf = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        ref = (a.long() @ w.long().t()).double()
        qw = torch._make_per_channel_quantized_tensor(w, torch.ones(n, dtype=torch.double),
                                                      torch.zeros(n, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        pos, neg = a.clamp_min(0).float(), (-a.float()).clamp_min(0)
        full = (a.float() + 128)
        wp = torch.ops.onednn.qlinear_prepack(w, [m, k])
        pu, nu = pos.to(torch.uint8), neg.to(torch.uint8)
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)

        def od(x):
            return torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, wp, ones, zeros, None, 1.0, 0, torch.float32,
                                                      "none", [], "")

        fns = {"fp32": lambda: xf @ wf.t(), "exact": lambda: cpu_gemm.int_matmul_prepared(a, w, "fp32_exact"),
               "int_mm": lambda: torch._int_mm(a, w.t()), "fb1": lambda: fq(full, 1.0, 128, packed),
               "fb2": lambda: fq(pos, 1.0, 0, packed) - fq(neg, 1.0, 0, packed), "od2": lambda: od(pu) - od(nu)}
        err = {key: (fns[key]().double() - ref).abs().max().item() for key in ("fb1", "fb2", "od2")}
        assert torch.equal(fns["exact"]().double(), ref)
        samples = {key: [] for key in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                inner = 1 if key == "int_mm" else 5
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[key].append((time.perf_counter() - start) * 1e3 / inner)
        med = {key: statistics.median(x) for key, x in samples.items()}
        print(f"| {m}×{k}×{n} | {med['fp32']:.3f} | {med['exact']:.3f} | {med['int_mm']:.3f} | {med['fb1']:.3f} "
              f"({err['fb1']:.0f}) | {med['fb2']:.3f} ({err['fb2']:.0f}) | {med['od2']:.3f} ({err['od2']:.0f}) | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-small", "groot-small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS, metavar="VARIANT")
    ap.add_argument("--parts", nargs="+", default=["prefix", "denoise", "sample"],
                    choices=["prefix", "denoise", "sample"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-ms", type=float, default=30.0, help="inner repeats per round add up to about this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--gemm", action="store_true", help="only the table of exact int8 GEMM candidates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["fp32 eager"] + [v for v in args.variants if v != "fp32 eager"]
    info = machine_info(args.threads)
    print(f"machine: {json.dumps(info)}")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.gemm:
        bench_int8_gemms(args.rounds)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            ctx = {"tmp": tmp}
            for batch in args.batches:
                variants, skipped = bench(model, batch, names, args.parts, args.rounds, args.min_ms, ctx)
                print_table(model, batch, variants, skipped, args.parts)
                results.append({"model": model, "batch": batch, "skipped": skipped, "rows": [
                    {"variant": v.name, "times_ms": v.times, "action_rel_l2": v.rel_l2,
                     "weight_bytes": v.weight_bytes, "build_s": v.build_s, "note": v.note} for v in variants]})
    print(f"\nload average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
