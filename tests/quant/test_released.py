"""Consuming compiles (quantize(..., consume=True)): the same program as a keeping compile, bit for bit, with the
float weights of the integer linears released during calibration and nothing else released."""
import pytest
import torch

import qvla_compiler
from qvla_compiler.models import build_policy
from qvla_compiler.quant.released import ConsumedWeightError, ReleasedWeight, is_released, release, storage_key
from policy_fixtures import released_names


def test_a_released_weight_keeps_its_shape_and_raises_a_named_error_on_use():
    lin = torch.nn.Linear(8, 4)
    release(lin.weight)
    assert is_released(lin.weight)
    assert lin.weight.shape == (4, 8) and lin.weight.dtype == torch.float32
    assert storage_key(lin.weight) == id(lin.weight)
    with pytest.raises(ConsumedWeightError, match="consume=True"):
        lin(torch.randn(2, 8))
    assert "ReleasedWeight([4, 8]" in repr(lin.weight) and isinstance(lin.weight, ReleasedWeight)


@pytest.mark.parametrize("model,recipe", [("pi05-tiny", "w8a8"), ("groot-tiny", "quantvla-w4a8+gptq")])
def test_a_consuming_policy_compile_matches_the_keeping_one(model, recipe):
    """Also a rotation recipe with ATM/OHB (its student applies the plan to the captured program) and GPTQ: the
    calibration fork quantizes rotated copies, and both those and the policy's own weights are released (a program
    built from the plan never reads an integer linear's float weight)."""
    kept, consumed = build_policy(model, seed=0), build_policy(model, seed=0)
    obs, calib = kept.example_inputs(), list(kept.calibration_batches(2))
    a = qvla_compiler.quantize(kept, obs, calib, recipe, progress=False)
    b = qvla_compiler.quantize(consumed, obs, calib, recipe, progress=False, consume=True)
    assert a.report.linears == b.report.linears and a.report.attention_scales == b.report.attention_scales
    run = (*(obs[k] for k in ("images", "tokens", "token_mask", "state")), kept.example_noise(obs["state"].shape[0]))
    assert torch.equal(a.module()(*run), b.module()(*run))
    tensors_a, tensors_b = _plan_tensors(a.quant_plan), _plan_tensors(b.quant_plan)
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(t, tensors_b[k]) for k, t in tensors_a.items())
    assert not released_names(kept)
    integer = {r.module_path + ".weight" for r in b.report.linears if r.bits != "float"}
    assert set(released_names(consumed)) == integer  # here no integer weight is read by anything else


def _plan_tensors(plan):
    return {(path, key): t for path, entry in plan.modules.items() for key, t in entry.tensors.items()}


def test_a_transformed_weight_has_one_holder_so_releasing_it_frees_it():
    """rotate_common.add_tensor records the registered buffer itself as the get_attr's meta["val"]: a second object
    over the same storage there kept every rotated copy alive after its release (RESULTS §14f)."""
    import torch.fx as fx

    from qvla_compiler.passes.rotate_common import add_tensor

    gm = fx.symbolic_trace(torch.nn.Linear(8, 4))
    node = add_tensor(gm, "w", torch.randn(4, 8).t(), next(iter(gm.graph.nodes)))  # non-contiguous: copied
    assert node.meta["val"] is getattr(gm, node.target)
    release(getattr(gm, node.target))
    assert is_released(node.meta["val"])
