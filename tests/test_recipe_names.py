"""Recipe names with options ("quantvla-w4a8+gptq"): each option changes one field; unknown ones are named."""
import dataclasses

import pytest

from qvla_compiler.errors import RecipeError
from qvla_compiler.meta import Region
from qvla_compiler.recipes import OPTIONS, RECIPES, recipe_from_name, resolve_recipe


def test_options_change_only_their_fields():
    base = RECIPES["quantvla-w4a8"]
    r = recipe_from_name("quantvla-w4a8+gptq+svd-hadamard+per_step+uniform")
    changed = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(r, f.name)}
    assert changed == {"name", "weight_method", "rotation", "act_mode", "layout"}
    assert (r.weight_method, r.rotation, r.act_mode, r.layout) == ("gptq", "svd-hadamard", "per_step", "uniform")


def test_a_budget_option_picks_the_auto_layout():
    r = recipe_from_name("w4a8+bpw4.75")
    assert (r.layout, r.bpw, r.needs_bit_allocation) == ("auto", 4.75, True)
    with pytest.raises(RecipeError, match="bpw"):
        recipe_from_name("w4a8+bpw1.5")  # below the kernels' 2 bits


def test_a_plain_preset_is_the_preset_object():
    assert recipe_from_name("w8a8") is RECIPES["w8a8"]
    assert resolve_recipe("w4a4+hadamard", layout="all").layout == "all"


def test_every_option_makes_a_valid_recipe():
    for option in OPTIONS:
        assert recipe_from_name(f"w4a8+{option}").name == f"w4a8+{option}"


def test_backbone_a8_widens_only_the_backbones_activations():
    r = recipe_from_name("omega-w4a4+backbone-a8")
    backbone, head = r.spec_for("lm.q_proj", Region.BACKBONE), r.spec_for("head.ff", Region.ACTION_HEAD)
    assert (backbone.w_bits, backbone.a_bits, head.w_bits, head.a_bits) == (4, 8, 4, 4)
    assert r.spec_for("head.ff").a_bits == 4  # no region: the recipe's own width
    assert RECIPES["omega-w4a4"].spec_for("lm.q_proj", Region.BACKBONE).a_bits == 4
    with pytest.raises(RecipeError, match="backbone_a_bits"):
        RECIPES["w4a4"].with_(backbone_a_bits=6)


@pytest.mark.parametrize("name,needle", [("w4a8+fast", "'fast'"), ("w5a8+gptq", "'w5a8'"), ("w4a8+auto", "'auto'")])
def test_unknown_names_say_what_exists(name, needle):
    with pytest.raises(RecipeError, match=needle):
        recipe_from_name(name)
