"""Train a tabletop preset (pi05-tabletop / groot-tabletop) by flow matching on expert action chunks.

One command per model, seeded and reproducible (fixed step count, fixed data, fixed thread and worker count); the
committed checkpoints came from (one after the other, each alone on both cores: groot in 27 minutes, pi05 in 25;
see qvla_compiler/eval/checkpoints/README.md)::

    python training/train_tabletop.py --model pi05 --seed 0 --episodes 14000 --steps 7200 --batch 64 --k-noise 2 \
        --threads 1 --workers 2 --save-every 1000 --eval-episodes 30 \
        --out qvla_compiler/eval/checkpoints/pi05-tabletop.safetensors
    python training/train_tabletop.py --model groot --seed 0 --episodes 12000 --family-episodes push=24000 \
        --steps 8600 --batch 64 --k-noise 2 --threads 1 --workers 2 --save-every 1000 --eval-episodes 30 \
        --out qvla_compiler/eval/checkpoints/groot-tabletop.safetensors

`--workers 2` runs two single-threaded data-parallel processes (`training/data_parallel.py`): each collects half
of the episodes and computes half of every batch, and the gradients are averaged before each step. That is how one
model uses both cores; two threads in one process are slower than one here.

`--family-episodes push=N` gives a family more demonstrations than `--episodes` (push is the hardest family and
had the fewest samples). Measured once per model (benchmarks/RESULTS.md section 5b): it lifted groot's push from
60.5% to 76.5% but not pi05's (39.0%, with its sequence down to 60.5%), so only groot's command uses it.

`--wide-push-starts P` (off in the committed commands) starts a share P of the push demonstrations anywhere around
the named block instead of behind it (`qvla_compiler.eval.tasks.redraw_push_start`): line-up and go-round data from
the states a policy reaches when it cuts the corner of the line-up, without DAgger's rollouts. Measured once on pi05
(P = 0.5, the committed recipe otherwise; benchmarks/RESULTS.md section 5b): the push episodes where the named block
never moves fell from 65 to 4 of 200, but push success stayed at 87 of 200 (the block was now carried off course or
pushed backwards) and sequence fell from 83.5% to 71.0%, so it is not used.

Demonstrations come from `collect_demonstrations` with episode seeds starting at 100000 (evaluation uses seeds
0..N-1, so they are disjoint). Flow-matching conventions, as each policy's `schedule` / `denoise_step` integrate:

  pi05  (t = 1 noise -> t = 0 data, Euler dt = -1/10): x_t = t * noise + (1 - t) * a,  v* = noise - a
  groot (t = 0 noise -> t = 1 data, Euler dt = +1/4):  x_t = (1 - t) * noise + t * a,  v* = a - noise

t ~ Beta(1.5, 1) mapped so that noisier times are more frequent (as pi0 / GR00T do). The observation prefix is run once
per sample and shared by `--k-noise` (t, noise) draws, which is cheap extra supervision for the action head.

Two stand-ins for what a pretrained VLM would bring (both training-only; the saved policy is the plain architecture):
`--aux-weight` adds the grounding losses of `training/tabletop_aux.py` (which object is where, which one the
instruction names), and pi0.5's state-bin token embeddings start ordinal (sinusoidal in the bin value), as a
pretrained LM's number tokens are, instead of as 256 unrelated random vectors.

`--dagger-rounds R` (off in the committed commands) adds DAgger: R times during training the averaged policy plays
`--dagger-episodes` fresh episodes per family, every state it visits is labelled with the expert's chunk from there
(`qvla_compiler.eval.dataset.collect_corrections`), and from then on `--dagger-mix` of every batch comes from those
corrections. Measured on the one-core recipe: no gain in success (9000 steps, two rounds of 400 episodes: groot
68.3% vs 67.2%, pi05 52.7% vs 53.5%; benchmarks/RESULTS.md section 5b), though push then fails differently.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvla_compiler.eval.dataset import collect_corrections, collect_demonstrations  # noqa: E402
from qvla_compiler.eval.runner import run_episodes, runner_kwargs, sample_actions_policy  # noqa: E402
from qvla_compiler.eval.tabletop import FAMILIES  # noqa: E402
from qvla_compiler.eval.tokenizer import Tokenizer  # noqa: E402
from qvla_compiler.models.checkpoints import save_checkpoint  # noqa: E402
from qvla_compiler.models.common import sinusoidal_embedding  # noqa: E402
from qvla_compiler.models.groot import GrootPolicy  # noqa: E402
from qvla_compiler.models.pi05 import Pi05Policy  # noqa: E402
from qvla_compiler.models.registry import build_policy, get_config  # noqa: E402
from data_parallel import average_gradients, broadcast_parameters, run_workers, sum_over_workers  # noqa: E402
from tabletop_aux import GroundingHeads, aux_loss, prefix_features, readout_features  # noqa: E402

DEMO_SEED = 100_000
DAGGER_SEED = 200_000     # episodes the policy plays during training (DAgger), disjoint from everything else
VALIDATION_SEED = 50_000  # the end-of-training check: disjoint from the demonstrations and from the evaluation seeds
N_EXEC = 4
_KEYS = ("images", "tokens", "token_mask", "state", "action_chunks", "landmarks", "objects")


def flow_targets(policy, actions: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_t, t, target velocity) for a batch of clean chunks, in the policy's own time convention."""
    b = actions.shape[0]
    noise = torch.randn(actions.shape, generator=gen)
    u = _beta(b, gen)
    u = 0.999 * u + 0.001  # in (0.001, 1]: close to 1 = mostly noise
    if isinstance(policy, GrootPolicy):
        t = (1.0 - u).clamp(0.0, 0.999)  # 0 = noise
        tt = t[:, None, None]
        return (1 - tt) * noise + tt * actions, t, actions - noise
    t = u  # pi05: 1 = noise
    tt = t[:, None, None]
    return tt * noise + (1 - tt) * actions, t, noise - actions


def _beta(n: int, gen: torch.Generator, a: float = 1.5) -> torch.Tensor:
    # Beta(a, 1) by inversion: F(x) = x^a, so x = U^(1/a); uses the seeded generator
    return torch.rand(n, generator=gen).pow(1.0 / a)


def init_state_embeddings(policy) -> None:
    """pi0.5 only: state-bin embedding rows = sinusoidal features of the bin value (row norm ~1, as the random init)."""
    if not isinstance(policy, Pi05Policy):
        return
    cfg = policy.config
    values = torch.linspace(-1.0, 1.0, cfg.state_bins)
    feats = sinusoidal_embedding(values, cfg.width, min_period=0.05, max_period=8.0) * (2.0 / cfg.width) ** 0.5
    with torch.no_grad():
        policy.language_model.embed_tokens.weight[cfg.state_token_offset:cfg.state_token_offset + cfg.state_bins] = feats


def repeat_prefix(prefix: tuple, k: int) -> tuple:
    return tuple(p.repeat_interleave(k, dim=0) for p in prefix)


class _Pool:
    """One sample pool read in seeded shuffled passes."""

    def __init__(self, data: dict, gen: torch.Generator):
        self.data = {k: data[k] for k in _KEYS}
        self.n, self.gen = data["images"].shape[0], gen
        self.perm, self.pos = torch.randperm(self.n, generator=gen), 0

    def take(self, k: int) -> torch.Tensor:
        if self.pos + k > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + k]
        self.pos += k
        return idx


class Batches:
    """Training batches: from the demonstrations and, once DAgger rounds have added some, a fixed share `mix` of
    every batch from the policy's corrections (fresh on-policy states would otherwise be a small minority)."""

    def __init__(self, demos: dict, batch: int, gen: torch.Generator, mix: float):
        self.demos, self.corrections = _Pool(demos, gen), None
        self.batch, self.gen, self.mix = batch, gen, mix

    def add_corrections(self, data: dict) -> None:
        if self.corrections is not None:
            data = {k: torch.cat([self.corrections.data[k], data[k]]) for k in _KEYS}
        self.corrections = _Pool(data, self.gen)

    def next(self) -> dict:
        if self.corrections is None:
            idx = self.demos.take(self.batch)
            return {k: v[idx] for k, v in self.demos.data.items()}
        k = round(self.batch * self.mix)
        a, b = self.demos.take(self.batch - k), self.corrections.take(k)
        return {key: torch.cat([self.demos.data[key][a], self.corrections.data[key][b]]) for key in _KEYS}


class WeightAverage:
    """Exponential moving average of a policy's parameters (decay warmed up as in diffusion-policy training)."""

    def __init__(self, policy: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = list(policy.parameters())
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, policy: torch.nn.Module) -> None:
        for p, s in zip(policy.parameters(), self.shadow):
            p.copy_(s)


@contextlib.contextmanager
def averaged(policy: torch.nn.Module, weights: WeightAverage | None):
    """Temporarily swap the averaged weights in (eval mode), e.g. to write an intermediate checkpoint."""
    live = [p.detach().clone() for p in policy.parameters()]
    policy.eval()
    if weights is not None:
        weights.copy_to(policy)
    try:
        yield policy
    finally:
        with torch.no_grad():
            for p, v in zip(policy.parameters(), live):
                p.copy_(v)
        policy.train()


def _report(what: str, rates: dict, episodes: int, t1: float) -> None:
    print(f"[eval] {what}: {episodes} validation episodes/family (seeds {VALIDATION_SEED}+): "
          + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
          + f", mean {sum(rates.values()) / len(rates):.3f} ({time.time() - t1:.0f}s)", flush=True)


def quick_eval(policy, episodes: int, seed: int = VALIDATION_SEED) -> dict:
    kw = runner_kwargs(policy.config)
    fn = sample_actions_policy(policy)
    out = {}
    for fam in FAMILIES:
        res = run_episodes(fam, range(seed, seed + episodes), fn, N_EXEC, noise_seed=0, **kw)
        out[fam] = sum(r.success for r in res) / len(res)
    return out


def dagger_round(policy, weights, cfg, args, round_index: int) -> dict:
    """Let the (averaged) policy play fresh episodes; every state it visits, labelled with the expert's chunk."""
    t1 = time.time()
    seed = DAGGER_SEED + 10_000 * args.seed + round_index * args.dagger_episodes
    with averaged(policy, weights):
        data = collect_corrections(sample_actions_policy(policy), args.dagger_episodes, seed, cfg.horizon,
                                   n_exec=N_EXEC, noise_seed=1000 + round_index, image_size=cfg.image_size,
                                   image_dtype=torch.uint8, action_dim=cfg.action_dim, state_dim=cfg.state_dim,
                                   tokenizer=Tokenizer(max_len=cfg.max_tokens), scene=True, every=args.dagger_every)
    print(f"[dagger] round {round_index + 1}: the policy solved {data['policy_success']:.2f} of "
          f"{args.dagger_episodes} episodes/family; {data['images'].shape[0]} corrections in {time.time() - t1:.0f}s",
          flush=True)
    return data


def episodes_by_family(default: int, overrides: list[str]) -> dict[str, int]:
    """{family: episodes} from --episodes and --family-episodes FAMILY=N entries."""
    counts = dict.fromkeys(FAMILIES, default)
    for item in overrides:
        fam, _, n = item.partition("=")
        if fam not in counts or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--family-episodes wants FAMILY=N with FAMILY in {list(FAMILIES)} and N >= 1, "
                             f"got {item!r}")
        counts[fam] = int(n)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="pi05-tabletop or groot-tabletop (pi05 / groot accepted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--episodes", type=int, default=800, help="expert episodes per family")
    ap.add_argument("--family-episodes", nargs="*", default=[], metavar="FAMILY=N",
                    help="override --episodes for some families, e.g. push=28000 (more data for the hardest family)")
    ap.add_argument("--steps", type=int, default=5000, help="length of the learning-rate schedule")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and save) after this many steps (<= --steps)")
    ap.add_argument("--expert-noise", type=float, default=0.1,
                    help="std of the noise added to the expert's executed actions (state diversity; labels stay clean)")
    ap.add_argument("--wide-push-starts", type=float, default=0.0, metavar="P",
                    help="share of the push demonstrations that start anywhere around the block, not behind it")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k-noise", type=int, default=4, help="(t, noise) draws per observation")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                    help="fused AdamW (--no-fused-adam: the per-tensor loop older checkpoints were trained with)")
    ap.add_argument("--threads", type=int, default=2, help="threads per process")
    ap.add_argument("--workers", type=int, default=1,
                    help="data-parallel processes (one per core; each collects and trains on its share of --episodes "
                         "and --batch, gradients averaged every step)")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the grounding losses (0: off)")
    ap.add_argument("--eval-episodes", type=int, default=20, help="held-out episodes per family at the end (0: none)")
    ap.add_argument("--ema-decay", type=float, default=0.999,
                    help="save an exponential moving average of the weights with this decay (0: the last weights)")
    ap.add_argument("--dagger-rounds", type=int, default=0,
                    help="times (evenly spaced) the policy plays --dagger-episodes per family and its visited states "
                         "are labelled by the expert and added to the data (DAgger; 0: pure behaviour cloning)")
    ap.add_argument("--dagger-episodes", type=int, default=500)
    ap.add_argument("--dagger-mix", type=float, default=0.5, help="share of every batch drawn from the corrections")
    ap.add_argument("--dagger-every", type=int, default=1,
                    help="record every k-th visited state (4 = only where the policy is asked for a chunk)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=500, help="also write the checkpoint every N steps (0: only at the end)")
    args = ap.parse_args(argv)
    if args.dagger_rounds < 0 or min(args.dagger_episodes, args.dagger_every) < 1 or not 0.0 < args.dagger_mix < 1.0:
        ap.error("need --dagger-rounds >= 0, --dagger-episodes >= 1, --dagger-every >= 1 and 0 < --dagger-mix < 1")
    try:
        args.episodes_by_family = episodes_by_family(args.episodes, args.family_episodes)
    except ValueError as e:
        ap.error(str(e))
    counts = sorted(set(args.episodes_by_family.values()))
    if args.workers < 1 or args.batch % args.workers or any(n % args.workers for n in counts):
        ap.error(f"--workers must be >= 1 and divide --batch ({args.batch}) and the episode counts ({counts})")
    if args.workers > 1 and args.dagger_rounds:
        ap.error("--dagger-rounds needs --workers 1 (DAgger rollouts are not split across processes)")
    args.t0 = time.time()
    run_workers(train, args.workers, args)
    return 0


def train(args, rank: int, world: int) -> None:
    """One process's share of the training run; rank 0 logs, saves and evaluates.  With one worker this is exactly
    the single-process run (same seeds, same random streams)."""
    name = args.model if args.model.endswith("-tabletop") else f"{args.model}-tabletop"
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cfg = get_config(name)
    data = collect_share(args, cfg, rank, world)
    kept, n = sum_over_workers([data["n_episodes_kept"], data["images"].shape[0]])
    log(f"[data] {kept:.0f} episodes, {n:.0f} samples ({world} worker(s)) in {time.time() - args.t0:.0f}s", flush=True)

    policy, heads, params, opt = build_trainee(name, args)
    ema_weights = WeightAverage(policy, args.ema_decay) if args.ema_decay else None
    gen = torch.Generator().manual_seed(args.seed + 7919 * rank)  # each rank its own batches and flow noise
    batches = Batches(data, args.batch // world, gen, args.dagger_mix)
    del data
    t_train, running = time.time(), RunningMetrics()
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    dagger_steps = {round(stop * (r + 1) / (args.dagger_rounds + 1)): r for r in range(args.dagger_rounds)}
    for step in range(stop):
        if step in dagger_steps:
            batches.add_corrections(dagger_round(policy, ema_weights, cfg, args, dagger_steps[step]))
        loss, logged = training_loss(policy, heads, batches.next(), args, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        running.update(*average_gradients(params, logged), aux=bool(args.aux_weight))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema_weights is not None:
            ema_weights.update(step)
        if rank:
            continue
        if args.save_every and step and step % args.save_every == 0:
            with averaged(policy, ema_weights):
                save_checkpoint(policy, args.out, {"model": name, "seed": str(args.seed), "partial_step": str(step)})
        if step % args.log_every == 0 or step == stop - 1:
            el = time.time() - t_train
            print(f"[train] step {step} {running} lr {lr_at(step, args):.2e} {el:.0f}s ({el / (step + 1):.3f}s/step)",
                  flush=True)
    if rank == 0:
        finish(policy, ema_weights, args, name, stop, running.flow)


def collect_share(args, cfg, rank: int, world: int) -> dict:
    """This worker's demonstrations: episode seeds base + rank * stride + (0 .. its share - 1) of each family, with
    stride = the largest share, so the workers' ranges are disjoint and, with equal counts, exactly those of one
    --episodes N."""
    shares = {f: n // world for f, n in args.episodes_by_family.items()}
    stride = max(shares.values())
    return collect_demonstrations(shares, DEMO_SEED + 10_000 * args.seed + rank * stride, cfg.horizon,
                                  expert_noise=args.expert_noise, image_size=cfg.image_size, image_dtype=torch.uint8,
                                  action_dim=cfg.action_dim, state_dim=cfg.state_dim,
                                  tokenizer=Tokenizer(max_len=cfg.max_tokens), scene=True,
                                  wide_push_starts=args.wide_push_starts)


def build_trainee(name: str, args) -> tuple:
    """(policy, grounding heads, their parameters, AdamW over them), the same initial weights on every worker."""
    cfg = get_config(name)
    policy = build_policy(name, seed=args.seed, pretrained=False)
    init_state_embeddings(policy)
    policy.train()
    read_dim = cfg.width if isinstance(policy, GrootPolicy) else cfg.head_dim
    heads = GroundingHeads(cfg.width, read_dim)
    params = list(policy.parameters()) + list(heads.parameters())
    broadcast_parameters(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=args.fused_adam)  # fused: one kernel for all tensors, ~7% of a step saved on CPU
    return policy, heads, params, opt  # params in this order: the gradient norm is summed in it


def lr_at(step: int, args) -> float:
    """Linear warm-up, then a cosine from --lr down to 5% of it at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_loss(policy, heads, data: dict, args, gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Flow matching on the batch's chunks (--k-noise draws per observation) plus the weighted grounding losses;
    also [flow loss, grounding accuracy, coordinate error] for the log."""
    cfg = policy.config
    images = data["images"].float().div_(255.0)
    prefix = policy.embed_prefix(images, data["tokens"], data["token_mask"], data["state"])
    actions = data["action_chunks"].repeat_interleave(args.k_noise, dim=0)
    x_t, t, target = flow_targets(policy, actions, gen)
    v = policy.denoise_step(repeat_prefix(prefix, args.k_noise), x_t, t)
    flow = torch.nn.functional.mse_loss(v, target)
    if not args.aux_weight:
        return flow, [flow.item(), 0.0, 0.0]
    img_h, txt_h = prefix_features(policy, prefix, cfg.max_tokens)
    read = readout_features(policy, prefix, cfg.max_tokens)
    agent = (data["state"][:, :2] + 1.0) * 0.5
    aux, stats = aux_loss(heads, img_h, txt_h, read, data["token_mask"], data["landmarks"], data["objects"], agent,
                          cfg.image_size // cfg.vision.patch_size)
    return flow + args.aux_weight * aux, [flow.item(), stats["ground_acc"], stats["coord_err"]]


class RunningMetrics:
    """Moving averages (0.98) of the logged losses, averaged over the workers."""

    def __init__(self):
        self.last, self.flow, self.acc, self.coord = None, None, 0.0, 0.5

    def update(self, flow: float, acc: float, coord: float, aux: bool) -> None:
        if aux:
            self.acc = 0.98 * self.acc + 0.02 * acc
            self.coord = 0.98 * self.coord + 0.02 * coord
        self.flow = flow if self.flow is None else 0.98 * self.flow + 0.02 * flow
        self.last = flow

    def __str__(self) -> str:
        return (f"flow loss {self.last:.4f} ema {self.flow:.4f} grounding acc {self.acc:.2f} "
                f"coord err {self.coord:.3f}")


def finish(policy, ema_weights, args, name: str, stop: int, final_loss: float) -> None:
    """Rank 0 after the last step: check the live weights, save the average with the run's metadata, check the file."""
    train_s = time.time() - args.t0
    policy.eval()
    if ema_weights is not None and args.eval_episodes:
        t1 = time.time()
        _report("last weights (not saved)", quick_eval(policy, args.eval_episodes), args.eval_episodes, t1)
    if ema_weights is not None:
        ema_weights.copy_to(policy)
    meta = {"model": name, "seed": str(args.seed), "steps": str(stop), "schedule_steps": str(args.steps),
            "episodes_per_family": ",".join(f"{f}={n}" for f, n in args.episodes_by_family.items()),
            "demo_seed": str(DEMO_SEED + 10_000 * args.seed), "batch": str(args.batch), "k_noise": str(args.k_noise),
            "lr": str(args.lr), "fused_adam": str(args.fused_adam), "threads": str(args.threads),
            "workers": str(args.workers), "expert_noise": str(args.expert_noise),
            "dagger_rounds": str(args.dagger_rounds), "dagger_episodes": str(args.dagger_episodes),
            "dagger_mix": str(args.dagger_mix), "dagger_every": str(args.dagger_every),
            "aux_weight": str(args.aux_weight), "ema_decay": str(args.ema_decay),
            "train_seconds": f"{train_s:.0f}", "final_loss_ema": f"{final_loss:.5f}", "command": " ".join(sys.argv)}
    path = save_checkpoint(policy, args.out, meta)
    print(f"[save] {path} ({path.stat().st_size / 1e6:.2f} MB) after {train_s:.0f}s", flush=True)
    if args.eval_episodes:
        # reload the fp16 file so the check measures exactly what was saved
        from qvla_compiler.models.checkpoints import load_checkpoint
        load_checkpoint(policy, path)
        t1 = time.time()
        _report("saved checkpoint", quick_eval(policy, args.eval_episodes), args.eval_episodes, t1)


if __name__ == "__main__":
    raise SystemExit(main())
