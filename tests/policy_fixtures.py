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


def unmoved_program(policy, plan):
    """`plan` applied to a fresh capture of `policy` without the passes that move work out of the denoise loop
    (hoist_invariants, table_time_values): the program the torch.compile backend builds, graph by graph."""
    from qvla_compiler import pipeline
    from qvla_compiler.export import capture_policy
    from qvla_compiler.program import Program

    program = Program(capture_policy(policy, policy.example_inputs(), policy.example_noise()), policy.schedule)
    pipeline.apply(program, plan, hoist=False)
    return program


def toy_observation(batch: int, horizon: int):
    """(observation, noise) for the toy policies of tests/lowering: images, 5 tokens, an 8-wide state; 2 actions."""
    import torch

    gen = torch.Generator().manual_seed(batch)
    return ({"images": torch.rand(batch, 3, 4, 4, generator=gen),
             "tokens": torch.randint(0, 9, (batch, 5), generator=gen),
             "token_mask": torch.rand(batch, 5, generator=gen) > 0.3, "state": torch.randn(batch, 8, generator=gen)},
            torch.randn(batch, horizon, 2, generator=gen))


def toy_program(policy, horizon: int):
    """`policy` captured at batch 2, as a Program."""
    from qvla_compiler.export import capture_policy
    from qvla_compiler.program import Program

    obs, noise = toy_observation(2, horizon)
    return Program(capture_policy(policy, obs, noise), policy.schedule)


def policy_args(policy, batch=3, seed=1):
    obs = policy.example_inputs(batch)
    return (obs["images"], obs["tokens"], obs["token_mask"], obs["state"], policy.example_noise(batch, seed=seed))


def rotate_policy(policy, recipe, calib_steps: int = 1):
    """Phases 1, 2 and 2b of the pipeline on a captured policy (no quantization): returns (program, obs, noise),
    observers still in and re-calibrated on the rotated activations."""
    from qvla_compiler.calibration import run_calibration as calibrate
    from qvla_compiler.export import capture_policy
    from qvla_compiler.passes import apply_layout, assign_regions, classify_linears, insert_observers, record_schedule
    from qvla_compiler.passes.rotate_and_smooth import fit_transforms, rotate_and_smooth
    from qvla_compiler.passes.rotate_common import reset_observers
    from qvla_compiler.program import Program, with_noise

    obs, noise = policy.example_inputs(), policy.example_noise()
    program = Program(capture_policy(policy, obs, noise), policy.schedule)
    for gm in program.graphs.values():
        record_schedule(gm)
        classify_linears(gm)
        assign_regions(gm)
        apply_layout(gm, recipe)
        insert_observers(gm)
    calib = list(with_noise(policy.calibration_batches(calib_steps), tuple(noise.shape[1:]), 0))
    calibrate(program, calib, progress=False)
    fit_transforms(program.graphs.values(), recipe)
    for gm in program.graphs.values():
        reset_observers(rotate_and_smooth(gm, recipe))
    calibrate(program, calib, progress=False)
    return program, obs, noise


def released_names(module) -> list[str]:
    """Names of `module`'s parameters and buffers a consuming compile released (quant/released.py)."""
    from qvla_compiler.quant.released import is_released

    return sorted(name for name, t in (*module.named_parameters(), *module.named_buffers()) if is_released(t))
