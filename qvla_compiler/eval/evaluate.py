"""Closed-loop evaluation of a quantized policy against its float original on the tabletop suite.

`evaluate` builds the float policy by name (the `*-tabletop` presets load their trained checkpoints), quantizes it with
`qvla_compiler.quantize` (calibrated on observations from scripted-expert episodes whose seeds are disjoint from the
evaluation seeds), then runs both policies on the SAME episodes (same families and seeds, hence the same initial
states) with the SAME diffusion noise at every policy call (`episode_noise(noise_seed, family, seed, call)`), so the
comparison is paired: McNemar's exact test on the discordant episodes, Wilson intervals per policy.

Example::

    from qvla_compiler.eval.evaluate import evaluate
    r = evaluate("pi05-tabletop", "w8a8", episodes=50)
    print(r["success_fp"], r["success_q"], r["p_value"], r["action_divergence"])
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.stats import paired_summary
from qvla_compiler.eval.runner import EpisodeResult, episode_noise, obs_to_batch, run_episodes, runner_kwargs
from qvla_compiler.eval.tabletop import FAMILIES, TabletopEnv

__all__ = ["FLOAT_RECIPES", "EVAL_NOISE_SEED", "CALIB_SEED", "N_EXEC", "calibration_observations", "evaluate"]

FLOAT_RECIPES = ("none", "float", "fp32")
N_EXEC = 4                 # actions executed per chunk (horizon 8 for the tabletop presets)
EVAL_NOISE_SEED = 0
CALIB_SEED = 200_000       # expert episodes for calibration; evaluation uses seeds seed .. seed+episodes-1
_POLICY_BATCH = 256        # most episodes per policy call


def calibration_observations(policy, n_batches: int, batch: int = 8, seed: int = CALIB_SEED,
                             families: Sequence[str] = FAMILIES) -> list[dict]:
    """`n_batches` observation dicts of `batch` rows, drawn from scripted-expert episodes (seeds from `seed`).

    The rows are spread over every step of the episodes, so calibration sees start, middle and end states."""
    from qvla_compiler.eval.dataset import collect_demonstrations
    from qvla_compiler.eval.tokenizer import Tokenizer

    cfg = policy.config
    per_family = max(1, -(-n_batches * batch // (len(families) * 12)))  # ~12+ steps per episode
    data = collect_demonstrations(per_family, seed, 1, families, image_size=cfg.image_size,
                                  action_dim=max(cfg.action_dim, 2), state_dim=cfg.state_dim,
                                  tokenizer=Tokenizer(max_len=cfg.max_tokens))
    n = data["images"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = []
    for b in range(n_batches):
        idx = order[torch.arange(b * batch, (b + 1) * batch) % n]
        out.append({k: data[k][idx] for k in ("images", "tokens", "token_mask", "state")})
    return out


def _module_policy_fn(module) -> Callable[[dict], torch.Tensor]:
    def fn(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return module(batch["images"], batch["tokens"], batch["token_mask"], batch["state"], batch["noise"])
    return fn


def _float_policy_fn(policy) -> Callable[[dict], torch.Tensor]:
    def fn(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return policy.sample_actions(batch["images"], batch["tokens"], batch["token_mask"], batch["state"],
                                         noise=batch["noise"])
    return fn


class _Progress:
    """Counts policy calls into a tqdm bar (total = a rough estimate, so the bar may end early)."""

    def __init__(self, fn, bar):
        self.fn, self.bar = fn, bar

    def __call__(self, batch):
        out = self.fn(batch)
        if self.bar is not None:
            self.bar.update(1)
        return out


def _first_chunk_divergence(fn_a, fn_b, families, seeds, kw, noise_seed) -> float:
    """Mean over episodes of ||chunk_a - chunk_b||_2 on each episode's first observation, same noise."""
    envs = [TabletopEnv(f, s, image_size=kw["image_size"]) for f, s in zip(families, seeds)]
    dists = []
    for start in range(0, len(envs), _POLICY_BATCH):
        group = envs[start:start + _POLICY_BATCH]
        batch = obs_to_batch([e.reset() for e in group], kw["tokenizer"], state_dim=kw["state_dim"])
        batch["noise"] = torch.stack([episode_noise(noise_seed, e.family, e.seed, 0, kw["horizon"], kw["action_dim"])
                                      for e in group])
        a, b = fn_a(batch), fn_b(batch)
        dists.append((a.double() - b.double()).flatten(1).norm(dim=1))
    return float(torch.cat(dists).mean())


def _write_video(path, fn_fp, fn_q, res_fp, res_q, kw, noise_seed, video_episodes) -> list[dict]:
    from qvla_compiler.eval.runner import run_episode
    from qvla_compiler.eval.video import write_side_by_side_gif

    by_key_q = {(r.family, r.seed): r for r in res_q}
    chosen: list[EpisodeResult] = []
    # prefer episodes where the two policies disagree, then one per family
    disagree = [r for r in res_fp if r.success != by_key_q[(r.family, r.seed)].success]
    for r in disagree + list(res_fp):
        if len(chosen) >= video_episodes:
            break
        if r not in chosen and (r in disagree or all(c.family != r.family for c in chosen)):
            chosen.append(r)
    frames_a, frames_b, meta = [], [], []
    run_kw = {k: kw[k] for k in ("horizon", "action_dim", "state_dim", "tokenizer")}
    for r in chosen:
        ea = run_episode(TabletopEnv(r.family, r.seed, image_size=kw["image_size"]), fn_fp, N_EXEC,
                         noise_seed=noise_seed, record_frames=True, **run_kw)
        eb = run_episode(TabletopEnv(r.family, r.seed, image_size=kw["image_size"]), fn_q, N_EXEC,
                         noise_seed=noise_seed, record_frames=True, **run_kw)
        # hold each episode's last frame so the episodes of the GIF line up
        n = max(len(ea.frames), len(eb.frames)) + 4
        frames_a += ea.frames + [ea.frames[-1]] * (n - len(ea.frames))
        frames_b += eb.frames + [eb.frames[-1]] * (n - len(eb.frames))
        meta.append({"family": r.family, "seed": r.seed, "instruction": r.instruction,
                     "success_fp": ea.success, "success_q": eb.success})
    if chosen:
        caption = "; ".join(f"{m['family']}#{m['seed']}" for m in meta)
        write_side_by_side_gif(str(path), frames_a, frames_b, labels=("float", "quantized"), caption=caption)
    return meta


def evaluate(model_name: str, recipe: str = "w8a8", layout: str | None = None, episodes: int = 200, seed: int = 0,
             families: Sequence[str] | None = None, calib_steps: int = 8, progress: bool = True,
             save_video: str | None = None, *, noise_seed: int = EVAL_NOISE_SEED, n_exec: int = N_EXEC,
             video_episodes: int = 3, calib_batch: int = 8, policy=None, float_cache: dict | None = None) -> dict:
    """Closed-loop success of `model_name` in float and quantized with `recipe` (and `layout`), paired.

    `episodes` is per family: episode seeds `seed .. seed+episodes-1` of each family in `families` (default all
    three). Recipe "none" / "float" / "fp32" skips quantization (the quantized policy IS the float policy: a sanity
    check, p_value 1 and divergence 0). `save_video=path.gif` writes float (left) and quantized (right) side by side
    for `video_episodes` episodes (disagreements first). `policy` overrides the policy built from `model_name`.
    `float_cache` (a dict the caller keeps) reuses the float rollouts across calls on the same model and episodes.

    Returns a dict with success_fp, success_q (overall rates), ci_fp, ci_q (95% Wilson), p_value (exact McNemar),
    episodes (total), episodes_per_family, action_divergence (mean L2 between the float and quantized first action
    chunks of every episode, same observation, same noise), per_family {family: {success_fp, success_q, ci_fp, ci_q,
    p_value, n}}, success_fp_<family> / success_q_<family>, discordant counts, timings and the quantization report
    summary (rel_error, sqnr_db, weight bytes) when quantized.
    """
    from qvla_compiler.models.registry import build_policy

    if episodes < 1:
        raise QvlaError(f"episodes must be >= 1 (per family), got {episodes}")
    families = list(FAMILIES if families is None else families)
    for f in families:
        if f not in FAMILIES:
            raise QvlaError(f"unknown task family {f!r}; use some of {list(FAMILIES)}")
    if seed < 0 or seed + episodes > CALIB_SEED:
        raise QvlaError(f"evaluation seeds {seed}..{seed + episodes - 1} must stay below {CALIB_SEED} "
                        "(calibration and training use the seeds above)")
    recipe_name = recipe if isinstance(recipe, str) else getattr(recipe, "name", str(recipe))
    is_float = isinstance(recipe, str) and recipe.lower() in FLOAT_RECIPES
    t_start = time.time()
    if policy is None:
        policy = build_policy(model_name)
    policy.eval()
    kw = runner_kwargs(policy.config)
    if kw["horizon"] < n_exec:
        raise QvlaError(f"{model_name} has horizon {kw['horizon']} < n_exec {n_exec}; pass a smaller n_exec")
    fn_fp = _float_policy_fn(policy)
    out: dict = {"model": model_name, "recipe": "float" if is_float else recipe_name,
                 "layout": None if is_float else layout, "noise_seed": noise_seed, "n_exec": n_exec,
                 "checkpoint": getattr(policy, "checkpoint_metadata", None) is not None}
    if is_float:
        fn_q = fn_fp
        out["quantize_seconds"] = 0.0
    else:
        import qvla_compiler

        t_q = time.time()
        calib = calibration_observations(policy, calib_steps, calib_batch)
        qp = qvla_compiler.quantize(policy, calib[0], calib, recipe=recipe, layout=layout, calib_steps=calib_steps,
                                    progress=False, model_name=model_name)
        # the eager graphs: the same integer program (ops and *_ref semantics) without Inductor's minutes per row
        fn_q = _module_policy_fn(qp.module(compiled=False))
        out["quantize_seconds"] = round(time.time() - t_q, 1)
        rep = qp.report
        out["layout"] = qp.recipe.layout
        out["report"] = {"action_rel_l2": rep.action_rel_l2, "action_sqnr_db": rep.action_sqnr_db,
                         "int_linears": rep.int_linears, "float_linears": rep.float_linears,
                         "policy_bytes_bf16": rep.policy_bytes_bf16, "policy_bytes_quant": rep.policy_bytes_quant}

    fam_list = [f for f in families for _ in range(episodes)]
    seed_list = [s for _ in families for s in range(seed, seed + episodes)]
    # rough call count for the bar: batched calls until the longest family ends (max_steps / n_exec), twice
    from qvla_compiler.eval.tabletop import MAX_STEPS
    est = 2 * sum(-(-MAX_STEPS[f] // n_exec) for f in families[:1]) if len(families) == 1 else \
        2 * max(-(-MAX_STEPS[f] // n_exec) for f in families) * max(1, -(-len(seed_list) // _POLICY_BATCH))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=est, desc=f"{model_name} {out['recipe']}{'' if is_float else '/' + str(out['layout'])}",
                   unit="call", leave=False)
    run_kw = {k: kw[k] for k in ("horizon", "action_dim", "state_dim", "tokenizer", "image_size")}
    t_run = time.time()
    try:
        key = (model_name, tuple(families), seed, episodes, noise_seed, n_exec)
        if float_cache is not None and key in float_cache:
            res_fp = float_cache[key]
        else:
            res_fp = run_episodes(fam_list, seed_list, _Progress(fn_fp, bar), n_exec, noise_seed,
                                  max_batch=_POLICY_BATCH, **run_kw)
            if float_cache is not None:
                float_cache[key] = res_fp
        res_q = res_fp if is_float else run_episodes(fam_list, seed_list, _Progress(fn_q, bar), n_exec,
                                                     noise_seed, max_batch=_POLICY_BATCH, **run_kw)
    finally:
        if bar is not None:
            bar.close()
    out["rollout_seconds"] = round(time.time() - t_run, 1)
    div = 0.0 if is_float else _first_chunk_divergence(fn_fp, fn_q, fam_list, seed_list, kw, noise_seed)

    summary = paired_summary(res_fp, res_q)
    ov = summary["overall"]
    out.update({
        "success_fp": ov["rate_a"], "success_q": ov["rate_b"],
        "ci_fp": tuple(ov["ci_a"]), "ci_q": tuple(ov["ci_b"]),
        "p_value": ov["p_mcnemar"], "episodes": ov["n"], "episodes_per_family": episodes,
        "fp_only": ov["a_only"], "q_only": ov["b_only"], "action_divergence": div,
        "nonfinite_actions_q": int(sum(r.nonfinite_actions for r in res_q)),
        "per_family": {},
    })
    for f in families:
        e = summary[f]
        out["per_family"][f] = {"success_fp": e["rate_a"], "success_q": e["rate_b"], "ci_fp": tuple(e["ci_a"]),
                                "ci_q": tuple(e["ci_b"]), "p_value": e["p_mcnemar"], "n": e["n"]}
        out[f"success_fp_{f}"] = e["rate_a"]
        out[f"success_q_{f}"] = e["rate_b"]
    # mean over families (equal weight), the suite's headline number; equals the overall rate for equal counts
    out["success_fp_mean"] = float(np.mean([out["per_family"][f]["success_fp"] for f in families]))
    out["success_q_mean"] = float(np.mean([out["per_family"][f]["success_q"] for f in families]))
    if save_video:
        out["video"] = str(save_video)
        out["video_episodes"] = _write_video(save_video, fn_fp, fn_q, res_fp, res_q, kw, noise_seed, video_episodes)
    out["seconds"] = round(time.time() - t_start, 1)
    return out
