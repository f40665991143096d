"""Action-guided mixed precision: the allocation against exhaustive search, the budget, and the auto layout."""
import itertools

import pytest
import torch

import qvla_compiler
from policy_fixtures import quantized_policy
from qvla_compiler.errors import RecipeError
from qvla_compiler.quant.mixed_precision import WIDTHS, allocate_bits, average_bits
from qvla_compiler.recipes import RECIPES, QuantRecipe


def _random_problem(n, seed):
    gen = torch.Generator().manual_seed(seed)
    params = {f"l{i}": int(torch.randint(1, 20, (1,), generator=gen)) * 64 for i in range(n)}
    errors = {}
    for p in params:  # each width narrower by one bit roughly doubles the error (by 1.5-3x), 8 → 4 bits by 8-40x
        e4 = float(torch.rand(1, generator=gen)) + 0.01
        e3 = e4 * (1.5 + 1.5 * float(torch.rand(1, generator=gen)))
        e2 = e3 * (1.5 + 1.5 * float(torch.rand(1, generator=gen)))
        errors[p] = {2: e2, 3: e3, 4: e4, 8: e4 / float(torch.randint(8, 40, (1,), generator=gen))}
    return errors, params


def _cost(widths, errors):
    return sum(0.0 if w == 16 else errors[p][w] ** 2 for p, w in widths.items())  # independent errors: squares add


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bpw", [2.0, 3.0, 3.5, 4.0, 5.0, 6.5, 9.0, 16.0])
def test_allocation_keeps_the_budget_and_equals_exhaustive_search(seed, bpw):
    errors, params = _random_problem(5, seed)
    widths = allocate_bits(errors, params, bpw)
    assert average_bits(widths, params) <= bpw + 1e-9
    best = min(_cost(dict(zip(params, combo)), errors) for combo in itertools.product(WIDTHS, repeat=len(params))
               if average_bits(dict(zip(params, combo)), params) <= bpw + 1e-9)
    assert _cost(widths, errors) == pytest.approx(best, abs=1e-12)  # the DP is exact: costs are multiples of its unit
    if bpw == 2.0:
        assert set(widths.values()) == {2}
    if bpw == 16.0:
        assert set(widths.values()) == {16} and _cost(widths, errors) == 0


def test_more_sensitive_linears_get_the_bits_first():
    params = {"a": 100, "b": 100, "c": 100}
    errors = {"a": {4: 0.5, 8: 0.01}, "b": {4: 0.05, 8: 0.001}, "c": {4: 0.2, 8: 0.004}}
    assert allocate_bits(errors, params, 16 / 3) == {"a": 8, "b": 4, "c": 4}
    assert allocate_bits(errors, params, 20 / 3) == {"a": 8, "b": 4, "c": 8}
    with pytest.raises(ValueError, match="below the narrowest measured widths"):  # 2 and 3 bits were not measured
        allocate_bits(errors, params, 3.5)


def test_budgets_below_the_kernels_narrowest_width_are_refused():
    with pytest.raises(RecipeError, match="bpw must be in \\[2, 16\\]"):
        RECIPES["w4a8"].with_(layout="auto", bpw=1.5)
    with pytest.raises(ValueError, match="below the narrowest width 2"):
        allocate_bits({"a": {2: 1.0}}, {"a": 64}, 1.9)
    with pytest.raises(RecipeError, match="give bpw"):
        QuantRecipe("x", layout="auto")


def test_auto_layout_measures_allocates_and_replays_from_its_plan(tmp_path):
    from qvla_compiler.models import build_policy

    policy = build_policy("pi05-tiny")
    recipe = RECIPES["w4a8"].with_(layout="auto", bpw=5.0)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=1, progress=False)
    chosen = qp.quant_plan.recipe_object()
    widths = dict(chosen.weight_bits)
    params = {r.module_path: r.params for r in qp.report.linears if r.call_site == 0 and r.module_path in widths}
    assert widths and average_bits(widths, params) <= 5.0 + 1e-9 and len(set(widths.values())) > 1
    rows = {r.module_path: r.bits for r in qp.report.linears}
    for path, width in widths.items():  # the plan compiled exactly the widths it chose
        assert rows[path] == ("float" if width == 16 else f"W{width}A8")
    qp.quant_plan.save(tmp_path / "plan")
    again = qvla_compiler.quantize(policy, policy.example_inputs(), plan=tmp_path / "plan", progress=False)
    args = (*policy.example_inputs().values(), policy.example_noise())
    with torch.no_grad():
        assert torch.equal(again.module()(*args), qp.module()(*args))
    # fewer bits than the QuantVLA layout spends on the same candidates (5.24), and less action error
    _, quantvla_layout = quantized_policy("pi05-tiny", "w4a8")
    assert qp.report.action_rel_l2 < quantvla_layout.report.action_rel_l2, (qp.report.action_rel_l2,
                                                                           quantvla_layout.report.action_rel_l2)


def test_gptq_recipes_measure_sensitivity_on_gptq_rounded_weights():
    from qvla_compiler import calibration as cal
    from qvla_compiler.export import capture_policy
    from qvla_compiler.models import build_policy
    from qvla_compiler.passes import apply_layout, assign_regions, classify_linears
    from qvla_compiler.program import Program, with_noise

    policy = build_policy("pi05-tiny")
    obs, noise = policy.example_inputs(), policy.example_noise()
    program = Program(capture_policy(policy, obs, noise), policy.schedule)
    batches = list(with_noise(policy.calibration_batches(1, seed=0), tuple(noise.shape[1:]), 0))
    recipe = RECIPES["w4a8"].with_(layout="auto", bpw=3.0)
    for gm in program.graphs.values():
        apply_layout(assign_regions(classify_linears(gm)), recipe)
    hessians = cal._input_hessians(program.fork(), batches, progress=False)
    rtn, params = cal.measure_weight_sensitivity(program, recipe, batches[0], (3,), progress=False)
    gptq, _ = cal.measure_weight_sensitivity(program, recipe, batches[0], (3,), hessians=hessians, progress=False)
    assert set(hessians) == set(rtn) == set(params) and len(params) == 28  # every candidate, one Hessian each
    # error compensation shows in the measured action errors, summed over the linears (measured 0.26 of RTN's)
    ratio = sum(e[3] for e in gptq.values()) / sum(e[3] for e in rtn.values())
    assert ratio < 0.6, ratio
    chosen = cal.choose_weight_bits(program, recipe.with_(weight_method="gptq"), batches, progress=False)
    assert average_bits(dict(chosen.weight_bits), params) <= 3.0 + 1e-9


def _auto_program(name="pi05-tiny"):
    from qvla_compiler.export import capture_policy
    from qvla_compiler.models import build_policy
    from qvla_compiler.passes import apply_layout, assign_regions, classify_linears
    from qvla_compiler.program import Program, with_noise

    policy = build_policy(name)
    obs, noise = policy.example_inputs(), policy.example_noise()
    program = Program(capture_policy(policy, obs, noise), policy.schedule)
    recipe = RECIPES["w4a8"].with_(layout="auto", bpw=4.0)
    for gm in program.graphs.values():
        apply_layout(assign_regions(classify_linears(gm)), recipe)
    return program, recipe, next(with_noise(policy.calibration_batches(1, seed=0), tuple(noise.shape[1:]), 0))


def test_gradient_estimate_ranks_linears_as_the_measurement_does():
    from scipy.stats import spearmanr

    from qvla_compiler import calibration as cal

    program, recipe, batch = _auto_program()
    weights = {id(p): (p, p.requires_grad, p.clone()) for gm in program.graphs.values() for p in gm.parameters()}
    measured, params = cal.measure_weight_sensitivity(program, recipe, batch, (2, 4), progress=False)
    estimated, same = cal.estimate_weight_sensitivity(program, recipe, batch, (2, 4), progress=False)
    assert same == params and set(estimated) == set(measured)
    for bits in (2, 4):  # pi05-tiny: 0.98 / 0.96 (28 linears); the small presets 0.96-0.98 (RESULTS §20)
        paths = sorted(measured)
        rho = spearmanr([measured[p][bits] for p in paths], [estimated[p][bits] for p in paths]).correlation
        assert rho > 0.8, (bits, rho)
        assert all(estimated[p][2] > estimated[p][4] for p in paths if measured[p][4] > 0)
    for p, flag, before in weights.values():  # weights untouched, their requires_grad flags restored
        assert p.requires_grad == flag and torch.equal(p, before)


def test_gradient_estimate_is_exact_in_expectation_for_a_linear_output():
    """y = x Wᵀ: the output is linear in W, so the first-order estimate has no linearisation error; with many
    projections it matches the measured ‖ΔW xᵀ‖ / ‖y‖ up to the sampling error of the projections (~3%)."""
    from qvla_compiler import calibration as cal
    from qvla_compiler.export import capture_module
    from qvla_compiler.passes import apply_layout, assign_regions, classify_linears
    from qvla_compiler.program import Program

    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(40, 64, generator=gen)
    program = Program(capture_module(model, (x,)))
    recipe = RECIPES["w4a8"].with_(layout="all", group_size=32)
    for gm in program.graphs.values():
        apply_layout(assign_regions(classify_linears(gm)), recipe)
    measured, _ = cal.measure_weight_sensitivity(program, recipe, (x,), (2, 3), progress=False)
    estimated, _ = cal.estimate_weight_sensitivity(program, recipe, (x,), (2, 3), projections=800, progress=False)
    last = max(measured)  # the output layer: exactly linear in its weight
    for bits in (2, 3):
        assert estimated[last][bits] == pytest.approx(measured[last][bits], rel=0.1)


def test_gradient_sensitivity_is_a_recipe_option():
    assert qvla_compiler.recipes.resolve_recipe("w4a8+bpw4.0+gradient").sensitivity == "gradient"
    assert RECIPES["w4a8"].sensitivity == "measured"
    with pytest.raises(RecipeError, match="sensitivity"):
        QuantRecipe("x", sensitivity="exact")
