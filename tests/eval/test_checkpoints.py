"""Trained tabletop checkpoints: load by name (skipped visibly when the file is absent), fp16 round trip, size,
and the documented training command matching the one in each file's header."""

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qvla_compiler.errors import QvlaError
from qvla_compiler.models import build_policy, get_config
from qvla_compiler.models.checkpoints import (
    CHECKPOINT_DIR, TRAINED_PRESETS, checkpoint_path, has_checkpoint, load_checkpoint, save_checkpoint,
)


@pytest.mark.parametrize("name", TRAINED_PRESETS)
def test_checkpoint_loads_by_name(name):
    if not has_checkpoint(name):
        pytest.skip(f"no trained checkpoint at {checkpoint_path(name)}; train it with training/train_tabletop.py")
    policy = build_policy(name)
    assert policy.checkpoint_metadata["model"] == name
    assert not policy.training
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    random = build_policy(name, pretrained=False)
    assert not torch.equal(next(policy.parameters()), next(random.parameters()))
    cfg = get_config(name)
    obs = policy.example_inputs(batch=2)
    actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=2))
    assert actions.shape == (2, cfg.horizon, cfg.action_dim) and torch.isfinite(actions).all()


def test_checkpoints_fit_the_size_budget():
    files = list(CHECKPOINT_DIR.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 25_000_000


def test_presets_fit_the_suite():
    from qvla_compiler.eval import ACTION_DIM, MAX_TOKENS, STATE_DIM
    for name in TRAINED_PRESETS:
        cfg = get_config(name)
        assert cfg.action_dim == ACTION_DIM and cfg.state_dim == STATE_DIM and cfg.max_tokens == MAX_TOKENS
        assert cfg.image_size in (32, 64) and cfg.horizon >= 4


def test_fp16_round_trip(tmp_path):
    policy = build_policy("pi05-tabletop", seed=3, pretrained=False)
    path = save_checkpoint(policy, tmp_path / "p.safetensors", {"model": "pi05-tabletop", "seed": 3})
    other = build_policy("pi05-tabletop", seed=4, pretrained=False)
    meta = load_checkpoint(other, path)
    assert meta["model"] == "pi05-tabletop" and meta["seed"] == "3"
    for (k, a), b in zip(policy.state_dict().items(), other.state_dict().values()):
        assert b.dtype == a.dtype, k
        assert torch.equal(a.half().float() if a.is_floating_point() else a, b), k


def test_mismatched_checkpoint_is_rejected(tmp_path):
    path = save_checkpoint(build_policy("pi05-tiny", pretrained=False), tmp_path / "t.safetensors")
    with pytest.raises(QvlaError, match="train_tabletop"):
        load_checkpoint(build_policy("pi05-tabletop", pretrained=False), path)


def _documented_commands(text: str) -> list[list[str]]:
    """The `train_tabletop.py` commands in `text`, backslash continuations joined, split into arguments."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split()[1:] for line in joined.splitlines()
            if line.strip().startswith("python training/train_tabletop.py")]


def _without_out(args: list[str]) -> list[str]:
    i = args.index("--out")
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize("name", TRAINED_PRESETS)
def test_documented_command_is_the_one_that_trained_the_file(name):
    """The checkpoints README and train_tabletop's docstring must name the command in the file's own header."""
    if not has_checkpoint(name):
        pytest.skip(f"no trained checkpoint at {checkpoint_path(name)}")
    with safe_open(str(checkpoint_path(name)), framework="pt") as f:
        trained = _without_out(f.metadata()["command"].split())
    root = Path(__file__).resolve().parents[2]
    # the file records the script where it lived then (benchmarks/, before training/ existed): compare the arguments
    for doc in (CHECKPOINT_DIR / "README.md", root / "training" / "train_tabletop.py"):
        documented = [_without_out(c)[1:] for c in _documented_commands(doc.read_text())]
        assert trained[1:] in documented, f"{doc} does not show the command that trained {name}: {' '.join(trained)}"
