"""GR00T N1.5 (lerobot 0.4.4 GrootPolicy) wrapped as a qvla policy, on a tiny random-weight build.

Needs lerobot 0.4.4 in its own folder (`TARGET=<dir> bash scripts/install_lerobot_groot.sh`, then
`PYTHONPATH=<dir> pytest tests/integrations/test_lerobot_groot.py`); skipped visibly otherwise.
"""
import functools

import pytest
import torch

pytestmark = pytest.mark.lerobot_groot
OBS = ("images", "tokens", "token_mask", "state")


@functools.lru_cache(maxsize=None)
def wrapped(use_bf16=False):
    from qvla_compiler.integrations.lerobot import wrap
    from qvla_compiler.integrations.lerobot_groot import build_tiny_groot

    return wrap(build_tiny_groot(seed=0, use_bf16=use_bf16))


@functools.lru_cache(maxsize=None)
def quantized(recipe, layout, use_bf16=False):
    import qvla_compiler

    w = wrapped(use_bf16)
    return qvla_compiler.quantize(w, w.example_inputs(), w.calibration_batches(4, seed=1),
                                  recipe=w.recipe(recipe, layout), progress=False)


def test_schedule_is_groots_loop():
    w = wrapped()
    assert w.schedule.timesteps == (0.0, 0.25, 0.5, 0.75) and w.schedule.dt == 0.25  # noise at 0, data at 1


@pytest.mark.parametrize("use_bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_layout_none_is_bit_identical_to_groots_get_action(use_bf16):
    """use_bf16 (GR00T's default): bf16 inputs and get_action under bf16 autocast, captured as they run (eager)."""
    w = wrapped(use_bf16)
    qp = quantized("w8a8", "none", use_bf16)
    assert qp.report.int_linears == 0
    obs = next(iter(w.calibration_batches(1, seed=7, batch=3)))
    noise = w.example_noise(3, seed=5)
    out = qp.module()(*(obs[k] for k in OBS), noise)
    assert torch.equal(out, w.sample_actions(**obs, noise=noise))
    # GrootPolicy's public API draws its own noise; with the same noise answered it returns the same chunk
    from qvla_compiler.integrations.lerobot_groot import _randn_returns

    with _randn_returns(noise), torch.no_grad():
        chunk = w.policy.predict_action_chunk(w.to_lerobot_batch(*(obs[k] for k in OBS)))
    assert torch.equal(w.to_lerobot_actions(out), chunk)


@pytest.mark.parametrize("use_bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_w8a8_quantvla_layout_is_llm_and_dit_mlps(use_bf16):
    qp = quantized("w8a8", "quantvla", use_bf16)
    rows = qp.report.linears
    integer = {r.module_path for r in rows if r.bits != "float"}
    llm = {r.module_path for r in rows if ".language_model.model.layers." in r.module_path}
    dit_ff = {r.module_path for r in rows if ".action_head.model.transformer_blocks." in r.module_path
              and ".ff." in r.module_path}
    assert llm and dit_ff and integer == llm | dit_ff  # QuantVLA's GR00T set: LLM + DiT MLPs, nothing else
    dit_attn = [r for r in rows if ".attn1." in r.module_path and ".model.transformer_blocks." in r.module_path]
    assert dit_attn and all(r.bits == "float" and r.role.startswith("attn") for r in dit_attn)
    assert all(r.bits == "float" for r in rows if "vl_self_attention" in r.module_path)
    assert 0 < qp.report.action_rel_l2 < 0.05
