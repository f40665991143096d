"""A tiny random-weight lerobot π0.5 folder shaped for LIBERO, written offline, to test the LIBERO harness.

    from qvla_compiler.eval.libero.tiny import write_tiny_libero_policy
    write_tiny_libero_policy("tiny-pi05-libero")      # then: qvla eval --suite libero --lerobot tiny-pi05-libero …
    # or: python -m qvla_compiler.eval.libero.tiny tiny-pi05-libero

The folder is what a real LIBERO checkpoint folder holds, at test sizes: lerobot's `config.json` + `model.safetensors`
(`save_pretrained`; cameras `observation.images.image` / `image2` at 64×64, an 8-D state, a 7-D action, chunk 10 with
5 executed steps) and lerobot's own pre/post-processor pipelines (quantile normalisation, π0.5's state-in-prompt
step, tokenizer, unnormalisation), so the harness runs the same code path as for a real checkpoint. Two stand-ins,
because nothing can be downloaded here: the weights are random (success means nothing; the mechanics do) and the
tokenizer is a small word-level one (`tokenizer/`: LIBERO's instruction words, the numbers 0–255 of the discretised
state, punctuation) instead of PaliGemma's. `qvla_tiny.json` marks the folder so that loading applies the tiny sizes.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from qvla_compiler.errors import QvlaError

__all__ = ["TINY_MARKER", "write_tiny_libero_policy", "tiny_kind"]

TINY_MARKER = "qvla_tiny.json"
IMAGE = 64
CHUNK, N_ACTION_STEPS = 10, 5
TOKENS = 48          # the prompt "Task: <instruction>, State: <8 numbers>;\nAction: " fits in 48 words
_SPECIAL = ["[PAD]", "[UNK]"]


def tiny_kind(path: str | os.PathLike) -> str | None:
    """The tiny lerobot kind a folder was written with (its qvla_tiny.json), or None for a real checkpoint."""
    marker = Path(path) / TINY_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))["kind"]


def _vocabulary() -> list[str]:
    words = set()
    try:
        from qvla_compiler.eval.libero.env import SUITES, suite_tasks

        for suite in SUITES:
            for _, _, instruction in suite_tasks(suite):
                words.update(re.findall(r"[a-z]+", instruction.lower()))
    except ImportError:  # without LIBERO the instruction words map to [UNK]
        pass
    return _SPECIAL + [str(i) for i in range(256)] + ["task", "state", "action", ":", ",", ";", "."] + sorted(words)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary()[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(folder))


def _stats() -> dict[str, dict[str, torch.Tensor]]:
    # plausible LIBERO ranges (eef xyz in metres, axis-angle, gripper fingers; delta actions): made up, like the weights
    state_lo = torch.tensor([-0.3, -0.3, 0.8, -3.2, -3.2, -3.2, 0.0, -0.04])
    state_hi = torch.tensor([0.3, 0.3, 1.3, 3.2, 3.2, 3.2, 0.04, 0.0])
    act_lo = torch.tensor([-0.5, -0.5, -0.5, -0.2, -0.2, -0.2, -1.0])
    act_hi = -act_lo

    def entry(lo, hi):
        return {"q01": lo, "q99": hi, "min": lo, "max": hi, "mean": (lo + hi) / 2, "std": (hi - lo) / 4,
                "q10": lo, "q50": (lo + hi) / 2, "q90": hi}

    return {"observation.state": entry(state_lo, state_hi), "action": entry(act_lo, act_hi)}


def write_tiny_libero_policy(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-weight lerobot PI05Policy for LIBERO (weights, config, processors, tokenizer) to `folder`."""
    from qvla_compiler.integrations.lerobot import _import
    from qvla_compiler.integrations.lerobot_tiny import VOCAB, build_tiny

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / TINY_MARKER).is_file():
        raise QvlaError(f"{folder} exists and is not a tiny policy folder; choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    types = _import("lerobot.configs.types")
    feat = types.PolicyFeature
    inputs = {f"observation.images.{k}": feat(type=types.FeatureType.VISUAL, shape=(3, IMAGE, IMAGE))
              for k in ("image", "image2")}
    inputs["observation.state"] = feat(type=types.FeatureType.STATE, shape=(8,))
    outputs = {"action": feat(type=types.FeatureType.ACTION, shape=(7,))}
    policy = build_tiny("pi05", seed=seed, input_features=inputs, output_features=outputs, chunk_size=CHUNK,
                        n_action_steps=N_ACTION_STEPS, tokenizer_max_length=TOKENS)
    policy.save_pretrained(str(folder))
    _write_tokenizer(folder / "tokenizer", VOCAB)

    proc = _import("lerobot.processor")
    pi05 = _import("lerobot.policies.pi05.processor_pi05")
    cfg = policy.config
    steps = proc.make_default_policy_processor_steps(cfg, _stats())
    pre = [steps.rename_observations, steps.add_batch_dim, steps.normalize,
           pi05.Pi05PrepareStateTokenizerProcessorStep(max_state_dim=cfg.max_state_dim),
           proc.TokenizerProcessorStep(tokenizer_name=str(folder / "tokenizer"), max_length=cfg.tokenizer_max_length,
                                       padding_side="right", padding="max_length"),
           steps.to_device]
    post = [steps.unnormalize, steps.to_cpu]
    preprocessor, postprocessor = proc.make_policy_processor_pipelines(input_steps=pre, output_steps=post)
    preprocessor.save_pretrained(str(folder))
    postprocessor.save_pretrained(str(folder))
    (folder / TINY_MARKER).write_text(json.dumps({"kind": "pi05", "seed": seed, "note": "random weights, word-level "
                                                  "tokenizer: for testing the LIBERO harness only"}) + "\n")
    return folder


if __name__ == "__main__":
    print(write_tiny_libero_policy(sys.argv[1] if len(sys.argv) > 1 else "tiny-pi05-libero"))
