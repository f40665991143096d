"""Action-aware weight-scale tuning (qvla_compiler/tuning.py): it lowers the output error it is fitted to, changes
only scales (never an integer), and a consuming compile, which has no float program to fit to, is refused before
anything is released. Its plans replay bit for bit: test_plan_replay.py's "quantvla-w4a8+gptq+tune" variant."""
import pytest
import torch

import qvla_compiler
from qvla_compiler.errors import RecipeError
from qvla_compiler.plan import WEIGHT_Q, WEIGHT_SCALE
from qvla_compiler.recipes import RECIPES, recipe_from_name
from toy_models import ToyPolicyNet


def _quantized_toy(base: str, group_size: int, tune_steps: int):
    torch.manual_seed(0)
    net = ToyPolicyNet().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, 8, generator=gen),) for _ in range(3)]
    recipe = RECIPES[base].with_(layout="all", group_size=group_size, tune_steps=tune_steps)
    qp = qvla_compiler.quantize(net, batches[0], batches, recipe=recipe, progress=False)
    with torch.no_grad():
        err = sum(float((qp.module()(*b) - net(*b)).norm() / net(*b).norm()) for b in batches) / len(batches)
    return qp, err


# 4-bit groups of 4 (several groups a row), 3-bit bit-planes, 8-bit per-channel scales
@pytest.mark.parametrize("base,group_size", [("w4a8", 4), ("w3a8", 4), ("w8a8", 128)])
def test_tuning_lowers_the_error_on_its_data_and_changes_only_scales(base, group_size):
    plain, before = _quantized_toy(base, group_size, 0)
    tuned, after = _quantized_toy(base, group_size, 40)
    # measured 0.109 -> 0.026 (w4a8), 0.259 -> 0.077 (w3a8), 0.013 -> 0.010 (w8a8)
    assert after < 0.9 * before, (before, after)
    changed = 0
    for path, entry in tuned.quant_plan.modules.items():
        if entry.is_quantized:
            base = plain.quant_plan.modules[path].tensors
            assert torch.equal(entry.tensors[WEIGHT_Q], base[WEIGHT_Q]), path
            assert entry.tensors[WEIGHT_SCALE].dtype == base[WEIGHT_SCALE].dtype
            changed += not torch.equal(entry.tensors[WEIGHT_SCALE], base[WEIGHT_SCALE])
    assert changed >= 2


def test_recipe_option_and_consume_refusal():
    assert recipe_from_name("w4a8-gptq+tune").tune_steps > 0
    with pytest.raises(RecipeError, match="tune_steps must be"):
        RECIPES["w4a8"].with_(tune_steps=-1)
    from qvla_compiler.models import build_policy
    from policy_fixtures import released_names

    policy = build_policy("pi05-tiny")
    with pytest.raises(RecipeError, match="consume"):
        qvla_compiler.quantize(policy, policy.example_inputs(), recipe="w4a8+tune", calib_steps=1, progress=False,
                               consume=True)
    assert released_names(policy) == []  # refused before any float weight was given up
