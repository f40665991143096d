"""Closed-loop evaluation: a miniature language-conditioned tabletop suite."""

from qvla_compiler.eval.tabletop import (
    ACTION_DIM, FAMILIES, IMAGE_SIZE, MAX_STEPS, STATE_DIM, TabletopEnv, make_episode,
)
from qvla_compiler.eval.runner import (
    EpisodeResult, episode_noise, obs_to_batch, run_episode, run_episodes, runner_kwargs,
    sample_actions_policy,
)
from qvla_compiler.eval.tokenizer import MAX_TOKENS, VOCAB, VOCAB_SIZE, Tokenizer, default_tokenizer
from qvla_compiler.eval.expert import ScriptedExpert
from qvla_compiler.eval.stats import mcnemar_exact, paired_summary, summarize, wilson_interval

__all__ = [
    "ACTION_DIM", "FAMILIES", "IMAGE_SIZE", "MAX_STEPS", "STATE_DIM", "EpisodeResult", "TabletopEnv",
    "episode_noise", "make_episode", "obs_to_batch", "run_episode", "run_episodes",
    "runner_kwargs", "sample_actions_policy", "MAX_TOKENS", "VOCAB", "VOCAB_SIZE", "Tokenizer", "default_tokenizer",
    "ScriptedExpert", "mcnemar_exact", "paired_summary", "summarize", "wilson_interval",
]
