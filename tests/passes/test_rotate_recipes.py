"""Recipes validate rotation/smooth; a rotated recipe lowers end to end with qvla:: rotation ops only."""
import pytest

import qvla_compiler
from qvla_compiler.errors import RecipeError
from qvla_compiler.models import build_policy
from qvla_compiler.passes.check_schedule import check_schedule
from qvla_compiler.recipes import RECIPES, QuantRecipe


@pytest.mark.parametrize("bad", [dict(rotation="spin"), dict(smooth="gptq"), dict(smooth_alpha=1.5),
                                 dict(rotation_block=1)])
def test_recipe_rejects_bad_rotation_fields(bad):
    with pytest.raises(RecipeError):
        QuantRecipe("bad", **bad)


def test_quantvla_presets_use_duquant():
    assert RECIPES["quantvla-w4a8"].rotation == "duquant" and RECIPES["quantvla-w4a8"].a_bits == 8
    assert RECIPES["quantvla-w4a4"].rotation == "duquant" and RECIPES["quantvla-w4a4"].a_bits == 4


def test_duquant_lowered_program_keeps_schedule():
    policy = build_policy("pi05-tiny")
    recipe = RECIPES["w4a8"].with_(rotation="duquant", rotation_block=64)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=1, progress=False)
    rotates = 0
    for gm in qp.program.graphs.values():
        check_schedule(gm)  # rotations are transparent qvla:: ops; nothing else was added
        rotates += sum(str(n.target) == "qvla.block_rotate.default" for n in gm.graph.nodes)
        for n in gm.graph.nodes:  # each rotation feeds an activation quantizer, never a float op
            if str(n.target) == "qvla.block_rotate.default":
                assert {str(u.target) for u in n.users} == {"qvla.quantize_act.default"}
    assert rotates > 0
    assert qp.report.action_sqnr_db > 15
