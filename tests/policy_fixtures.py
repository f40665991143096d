"""Quantized tiny policies shared by tests (cached: each costs an export)."""
import functools


@functools.lru_cache(maxsize=None)
def quantized_policy(name: str, recipe: str, layout: str | None = None):
    """(policy, QuantizedProgram) — quantizing costs an export, so each combination is made once per session."""
    import qvla_compiler
    from qvla_compiler.models import build_policy

    policy = build_policy(name)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, layout=layout, calib_steps=2,
                                progress=False, model_name=name)
    return policy, qp


def policy_args(policy, batch=3, seed=1):
    obs = policy.example_inputs(batch)
    return (obs["images"], obs["tokens"], obs["token_mask"], obs["state"], policy.example_noise(batch, seed=seed))
