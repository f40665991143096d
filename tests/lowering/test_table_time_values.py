"""table_time_values: what the denoise step computes from its time input alone is computed once per sample for all
the schedule's timesteps, in the prefix; values that mix rows, read x or hold nothing heavy stay in the step."""
import math

import pytest
import torch
from torch import nn

from qvla_compiler.lowering.table_time_values import table_time_values
from qvla_compiler.meta import QVLA_META
from qvla_compiler.models import build_policy
from qvla_compiler.models.sampling import FlowSchedule
from qvla_compiler.passes import check_schedule
from tests.policy_fixtures import toy_observation, toy_program, unmoved_program

aten = torch.ops.aten


class TimedPolicy(nn.Module):
    """An AdaLN-style step: a time MLP, then one modulation linear giving scale and shift; `form` varies how the
    step reads the time."""

    def __init__(self, form: str = "adaln"):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.schedule = form, FlowSchedule.uniform(1.0, 0.0, 5)
        self.time_in, self.time_out, self.modulation = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.embed, self.to_x, self.out = nn.Linear(8, 4), nn.Linear(2, 4), nn.Linear(4, 2)

    def embed_prefix(self, images, tokens, token_mask, state):
        return (self.embed(state),)

    def denoise_step(self, prefix, x_t, t):
        if self.form == "first row":  # every row reads t[0]: rows of other timesteps would read the wrong one
            t = t[:1].expand(t.shape[0])
        elif self.form == "flipped":
            t = t.flip(0)
        elif self.form == "outer":  # [B, 1] * [B] broadcasts to [B, B]: each row reads every row's t
            t = (t[:, None] * t).mean(1)
        freqs = torch.exp(torch.arange(4, dtype=t.dtype) * (-math.log(100.0) / 4))
        angles = t[:, None] * freqs
        emb = self.time_out(nn.functional.silu(self.time_in(torch.cat([angles.sin(), angles.cos()], -1))))
        if self.form == "batch mean":
            emb = emb.mean(0, keepdim=True).expand(t.shape[0], -1)
        elif self.form == "reads x":
            emb = emb * x_t.mean((1, 2))[:, None]
        scale, shift = self.modulation(nn.functional.silu(emb)).type_as(x_t).chunk(2, dim=-1)
        h = self.to_x(x_t) + prefix[0][:, None]
        return self.out(nn.functional.layer_norm(h, (4,)) * (1 + scale[:, None]) + shift[:, None])


def _obs(batch):
    return toy_observation(batch, horizon=6)


def _program(policy):
    return toy_program(policy, horizon=6)


def _linears(gm):
    return gm.graph.find_nodes(op="call_function", target=aten.linear.default)


def test_time_mlp_and_modulation_are_computed_once_for_every_timestep():
    policy = TimedPolicy()
    program = _program(policy)
    inputs = _obs(3)
    want = program.run(inputs)
    moved = table_time_values(program.graphs["prefix"], program.graphs["denoise"], policy.schedule.timesteps)
    assert len(moved) == 2 and all(m.endswith(" per timestep") for m in moved)  # 1 + scale, and shift
    denoise = program.graphs["denoise"]
    assert len(_linears(denoise)) == 2  # to_x and out: the three time linears run in the prefix, once per sample
    assert len(_linears(program.graphs["prefix"])) == 4
    # fp32 GEMMs over 3·5 rows instead of 3 may round otherwise: equal to the GEMM's rounding
    torch.testing.assert_close(program.run(inputs), want, rtol=1e-5, atol=1e-6)
    exported = program.export(tuple(_obs(2)[0].values()) + (_obs(2)[1],))  # the saved form, batch dynamic
    pre = exported["prefix"].module()(*inputs[0].values())
    assert [tuple(p.shape) for p in pre] == [(3, 4), (3, 5, 1, 4), (3, 5, 1, 4)]  # [B, S, …]: a row per timestep
    for t in policy.schedule.timesteps:
        step = torch.full((3,), t)
        got = exported["denoise"].module()(tuple(pre), inputs[1], step)
        torch.testing.assert_close(got, policy.denoise_step(policy.embed_prefix(*inputs[0].values()), inputs[1],
                                                            step), rtol=1e-5, atol=1e-6)


def test_a_time_that_is_not_a_scheduled_timestep_fails_loudly():
    policy = TimedPolicy()
    program = _program(policy)
    table_time_values(program.graphs["prefix"], program.graphs["denoise"], policy.schedule.timesteps)
    obs, noise = _obs(3)
    prefix = program.graphs["prefix"](*obs.values())
    program.graphs["denoise"](tuple(prefix), noise, torch.full((3,), 0.6))  # a scheduled timestep
    with pytest.raises(RuntimeError, match="not one of the schedule's timesteps"):
        program.graphs["denoise"](tuple(prefix), noise, torch.tensor([0.6, 0.6, 0.65]))


@pytest.mark.parametrize("form", ["first row", "flipped", "outer", "batch mean", "reads x"])
def test_values_that_mix_rows_or_read_the_action_stay_in_the_step(form):
    policy = TimedPolicy(form)
    program = _program(policy)
    before = {name: gm.code for name, gm in program.graphs.items()}
    moved = table_time_values(program.graphs["prefix"], program.graphs["denoise"], policy.schedule.timesteps)
    if form == "reads x":  # the time MLP alone still moves; the product with x and what follows stay
        assert len(moved) == 1
        assert len(_linears(program.graphs["denoise"])) == 3
    else:
        assert moved == []
        assert {name: gm.code for name, gm in program.graphs.items()} == before


def test_float_gemms_stay_when_asked_and_a_float_program_keeps_its_bits():
    policy = TimedPolicy()
    program = _program(policy)
    before = {name: gm.code for name, gm in program.graphs.items()}
    assert table_time_values(program.graphs["prefix"], program.graphs["denoise"], policy.schedule.timesteps,
                             float_gemms=False) == []
    assert {name: gm.code for name, gm in program.graphs.items()} == before


def test_groot_integer_modulation_is_bit_identical_in_the_saved_program(tmp_path):
    """GR00T's timestep MLP and AdaLN linears made integer (a role override: they are "other", float, by default):
    the table is exact, so the program is bit-identical to the one that computes them every step."""
    import dataclasses

    import qvla_compiler
    from qvla_compiler.recipes import recipe_from_name

    policy = build_policy("groot-tiny")
    timed_linears = tuple((path, "mlp") for path in ("action_head.timestep_encoder", "action_head.transformer_blocks",
                                                     "action_head.proj_out_1"))
    recipe = dataclasses.replace(recipe_from_name("w8a8"), role_overrides=timed_linears)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=2, progress=False)
    timed = [h for h in qp.report.hoisted if h.endswith(" per timestep")]
    blocks = len(policy.action_head.transformer_blocks)
    assert len(timed) == 2 * blocks + 2, qp.report.hoisted  # scale and shift of each norm1 and of proj_out_1
    assert "action_head.timestep_encoder.linear_1" in timed[0]
    denoise = qp.program.graphs["denoise"]
    paths = {getattr(n.meta.get(QVLA_META), "module_path", "") for n in denoise.graph.nodes}
    assert not any(".norm1.linear" in p or "timestep_encoder" in p for p in paths)
    assert not [n for n in _linears(qp.program.graphs["prefix"])  # the tabled linears run integer
                if "timestep" in getattr(n.meta.get(QVLA_META), "module_path", "")]
    for gm in qp.program.graphs.values():
        check_schedule(gm)  # the recorded schedules follow the move
    obs, noise = policy.example_inputs(3), policy.example_noise(3)
    loaded = qvla_compiler.load(qp.save(tmp_path / "groot.pt2"))
    assert loaded.report.hoisted == qp.report.hoisted
    with torch.no_grad():
        got = loaded.module(compiled=False)(*obs.values(), noise)
        untabled = unmoved_program(policy, qp.quant_plan).run((obs, noise))
    assert torch.equal(got, qp.program.run((obs, noise)))
    assert torch.equal(got, untabled)

