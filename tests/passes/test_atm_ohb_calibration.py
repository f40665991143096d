"""ATM/OHB calibration: the math, observers that change nothing, recovery of a planted drift, and the quantize() path.

Planted drift: the student is a copy of the float program with one head's q_proj rows (or one o_proj) scaled by 0.8;
the teacher/student statistics must then give α ≈ 1/0.8 = 1.25 for that head (β ≈ 1.25 for that layer) and ≈ 1
elsewhere — on the explicit-attention π0.5 expert and on the SDPA GR00T DiT.
"""
import copy
import functools
import math

import pytest
import torch

import qvla_compiler
from qvla_compiler.calibration import (ATM_STYLES, AtmStyle, atm_alpha, collect_batches, observe_program,
                                       observe_teacher, ohb_beta)
from qvla_compiler.errors import CalibrationError
from qvla_compiler.export import capture_policy
from qvla_compiler.models import build_policy
from qvla_compiler.passes._attention_sites import attention_sites
from qvla_compiler.passes.observe_attention import LogitObserver
from qvla_compiler.passes.check_schedule import check_schedule
from qvla_compiler.passes._graph import attr_tensor as _get, replace_attr_tensor as _set
from qvla_compiler.program import Program, with_noise
from qvla_compiler.recipes import QuantRecipe
from qvla_compiler.inspect.report import Report

WIDE = AtmStyle(0.5, 2.0, 0.0, inclusive=False)


def test_alpha_clip_and_neutral_bands():
    pi05, groot = ATM_STYLES["pi05"], ATM_STYLES["groot"]
    assert atm_alpha([2.0, 1.0, 0.5], [1.0, 1.0, 1.0], pi05) == [1.25, 1.0, 0.8]
    assert atm_alpha([2.0, 0.5], [1.0, 1.0], groot) == [1.4, 0.7]
    assert atm_alpha([1.05], [1.0], pi05) == [1.0]  # |α − 1| ≤ 0.05 snaps (π0.5: inclusive)
    assert atm_alpha([1.03], [1.0], groot) == pytest.approx([1.03], rel=1e-5)  # outside GR00T's 0.02 band
    assert atm_alpha([1.019], [1.0], groot) == [1.0]
    assert atm_alpha([1.0], [0.0], pi05) == [1.0]  # a silent student head is left alone
    with pytest.raises(CalibrationError, match="non-finite"):  # never a NaN folded into q
        atm_alpha([float("nan")], [1.0], pi05)


def test_logit_std_skips_minus_inf_masked_entries():
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    valid = torch.rand(2, 1, 1, 5) > 0.3
    valid[..., 0] = True
    obs = LogitObserver()
    obs(scores.masked_fill(~valid, float("-inf")))  # masked_fill(-inf), nn.MultiheadAttention's key padding
    want = [float(torch.stack([scores[b, h][valid[b, 0].expand(4, 5)].std(unbiased=False) for b in range(2)]).mean())
            for h in range(3)]
    assert obs.std() == pytest.approx(want, rel=1e-12)


class _MaskedCrossAttention(torch.nn.Module):
    """An action head's cross-attention over a padded prefix, keys masked with -inf (evo1's shape)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(6, 32), torch.nn.Linear(32, 6)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x_t, t, prefix, prefix_mask):
        h = self.inp(x_t) + t[:, None, None]
        split = lambda z: z.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
        s = split(self.q(h)) @ split(self.k(prefix)).transpose(-1, -2) / 8 ** 0.5
        s = s.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
        return self.out(h + self.o((s.softmax(-1) @ split(self.v(prefix))).transpose(1, 2).flatten(2)))


def test_atm_on_minus_inf_masked_attention_stays_finite():
    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, -2:] = False
        return torch.randn(2, 4, 6, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g), mask

    torch.manual_seed(0)
    qp = qvla_compiler.quantize(_MaskedCrossAttention().eval(), inputs(0), [inputs(i) for i in range(1, 4)],
                                "w8a8+atm", progress=False, input_roles={"prefix": "prefix", "prefix_mask": "prefix"})
    (site,) = qp.quant_plan.attention["graphs"]["forward"]
    assert all(map(math.isfinite, site["alpha"] + site["logit_std_teacher"] + site["logit_std_student"]))
    assert qp.report.action_rel_l2 < 0.01  # was NaN: -inf · 0 in the logit statistics


def test_beta_log_clip_and_neutral_band():
    assert ohb_beta(2.0, 1.0) == pytest.approx(math.exp(0.3))
    assert ohb_beta(1.0, 2.0) == pytest.approx(math.exp(-0.3))
    assert ohb_beta(1.0, 0.8) == pytest.approx(1.25, rel=1e-5)
    assert ohb_beta(1.02, 1.0) == 1.0  # |log β| < 0.03
    assert ohb_beta(1.0, 0.0) == 1.0


@functools.lru_cache(maxsize=None)
def _programs(name):
    """(policy, float teacher program, calibration batches, teacher stats); tests never leave the program changed."""
    policy = build_policy(name)
    obs = policy.example_inputs()
    noise = policy.example_noise(2)
    teacher = Program(capture_policy(policy, obs, noise), policy.schedule)
    batches = collect_batches(with_noise(policy.calibration_batches(2, seed=3), tuple(noise.shape[1:]), 3))
    stats = observe_teacher(teacher, QuantRecipe("float", layout="none"), batches)
    return policy, teacher, batches, stats


def _scale_rows(gm, node, rows: slice, factor: float):
    w = _get(gm, node.args[1].target).detach().clone()
    w[rows] *= factor
    _set(gm, node.args[1].target, w)


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_observers_change_nothing(name):
    policy, program, batches, _ = _programs(name)
    before = program.run(batches[0])
    code = {k: gm.code for k, gm in program.graphs.items()}
    observe_program(program, batches[:1])
    assert {k: gm.code for k, gm in program.graphs.items()} == code
    assert torch.equal(program.run(batches[0]), before)


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_planted_query_drift_is_recovered(name):
    policy, teacher, batches, t_stats = _programs(name)
    student = Program(copy.deepcopy(teacher.graphs), teacher.schedule)
    gm = student.graphs["denoise"]
    sites = attention_sites(gm)
    site, head = sites[-1], 1
    _scale_rows(gm, site.q_linears[0], slice(head * site.head_dim, (head + 1) * site.head_dim), 0.8)
    s_stats = observe_program(student, batches)
    for s in sites:
        alpha = atm_alpha(t_stats["denoise"][s.block].logit_std, s_stats["denoise"][s.block].logit_std, WIDE)
        for h, a in enumerate(alpha):
            if (s.block, h) == (site.block, head):
                assert a == pytest.approx(1.25, abs=0.02)
                clipped = atm_alpha([a * 1.1], [1.0], ATM_STYLES["pi05"])[0]
                assert clipped == 1.25  # a stronger drift stops at the π0.5 bound
            else:
                assert a == pytest.approx(1.0, abs=0.03), (s.block, h)


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_planted_output_drift_is_recovered(name):
    policy, teacher, batches, t_stats = _programs(name)
    student = Program(copy.deepcopy(teacher.graphs), teacher.schedule)
    gm = student.graphs["denoise"]
    sites = attention_sites(gm)
    o = sites[-1].o_linears[0]
    _scale_rows(gm, o, slice(None), 0.8)
    if len(o.args) > 2 and o.args[2] is not None:
        _set(gm, o.args[2].target, _get(gm, o.args[2].target).detach() * 0.8)
    s_stats = observe_program(student, batches)
    for s in sites:
        beta = ohb_beta(t_stats["denoise"][s.block].energy_rms, s_stats["denoise"][s.block].energy_rms,
                        log_clip=0.3, neutral=0.0)
        assert beta == pytest.approx(1.25 if s is sites[-1] else 1.0, abs=0.03), s.block
        assert beta <= math.exp(0.3) + 1e-9


@pytest.mark.parametrize("name,atm,ohb", [("pi05-tiny", True, True), ("groot-tiny", True, False),
                                          ("groot-tiny", False, True)])
def test_quantize_records_and_folds(name, atm, ohb):
    policy = build_policy(name)
    recipe = QuantRecipe("w4a4-atm", w_bits=4, a_bits=4, layout="all", atm=atm, ohb=ohb)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=2, progress=False)
    scales = qp.report.attention_scales
    heads = policy.config.heads if name.startswith("pi05") else policy.config.dit_heads
    layers = policy.config.layers if name.startswith("pi05") else policy.config.dit_layers
    rows = scales["graphs"]["denoise"]
    assert [r["block"] for r in rows] == [s.block for s in attention_sites(qp.program.graphs["denoise"])]
    assert len(rows) == layers and all(len(r["alpha"]) == heads for r in rows)
    assert all(r["alpha_fold"] == "q_proj" for r in rows)
    if not atm:
        assert all(a == 1.0 for r in rows for a in r["alpha"])
    if not ohb:
        assert all(r["beta"] == 1.0 for r in rows)
    for gm in qp.program.graphs.values():
        check_schedule(gm)  # folding added no op
    assert Report.from_json(qp.report.to_json()).attention_scales == scales


def test_quantvla_presets_enable_both():
    from qvla_compiler.recipes import RECIPES
    assert RECIPES["quantvla-w4a8"].atm and RECIPES["quantvla-w4a8"].ohb
    assert RECIPES["quantvla-w4a4"].atm and RECIPES["quantvla-w4a4"].ohb
