"""hoist_invariants: what the denoise step computes from the prefix alone moves into the prefix graph, bit-exactly;
cheap, time-dependent, random and in-place values stay in the step."""
import pytest
import torch
from torch import nn

from qvla_compiler.export import capture_policy
from qvla_compiler.lowering.hoist_invariants import hoist_invariants
from qvla_compiler.models import build_policy
from qvla_compiler.models.sampling import FlowSchedule
from qvla_compiler.passes import check_schedule
from tests.policy_fixtures import quantized_policy, toy_observation, toy_program


class ToyPolicy(nn.Module):
    """Prefix: features [B, 3, 8] from the state, and the token mask. Step: `form` says how it reads them."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.schedule = form, FlowSchedule.uniform(0.0, 1.0, 3)
        self.embed, self.to_k, self.to_v = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 8)
        self.to_q, self.out = nn.Linear(2, 8), nn.Linear(8, 2)

    def embed_prefix(self, images, tokens, token_mask, state):
        return self.embed(state).view(-1, 3, 8), token_mask

    def denoise_step(self, prefix, x_t, t):
        feats, mask = prefix
        if self.form == "time-scaled":
            feats = feats * t[:, None, None]
        elif self.form == "random":
            feats = feats + torch.rand_like(feats)
        elif self.form == "in place":  # every step scales the prefix tensor again: the next step sees another value
            feats.mul_(2)
        q = self.to_q(x_t)
        if self.form == "mask only":
            return self.out(q) * mask[:, :1].float()[:, :, None]
        k, v = self.to_k(feats), self.to_v(feats).relu()
        if self.form == "batch not first":  # the step reads K as [3, B, 8]; the saved step takes prefix values
            k = k.permute(1, 0, 2).relu()    # batch-first, so to_k's output moves, the permute and relu stay
            return self.out(torch.softmax(torch.einsum("bqd,kbd->bqk", q, k), -1) @ v)
        if self.form == "repeated":  # keys and values repeated twice over (SmolVLA's key heads, per query group)
            k, v = (a[:, :, None].expand(-1, -1, 2, -1).reshape(a.shape[0], 6, 8) for a in (k, v))
        if self.form == "batch from x":  # export reads the batch size off x_t: the moved copy reads it off feats
            k = k.reshape(x_t.shape[0], -1).view(x_t.shape[0], 3, 8)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def _obs(batch):
    return toy_observation(batch, horizon=4)


def _program(policy):
    return toy_program(policy, horizon=4)


@pytest.mark.parametrize("form", ["cross", "batch from x", "batch not first"])
def test_projections_of_the_prefix_move_and_every_output_is_bit_identical(form):
    program = _program(ToyPolicy(form))
    inputs = _obs(3)
    want = program.run(inputs)
    moved = hoist_invariants(program.graphs["prefix"], program.graphs["denoise"])
    assert len(moved) == 2  # K (to_k's output, or what its views read) and to_v's relu: the step computes neither
    denoise = program.graphs["denoise"]
    assert len(denoise.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)) == 2  # q, out
    assert not [n for n in denoise.graph.nodes if n.target in (torch.ops.aten.view.default,
                                                               torch.ops.aten.reshape.default)]  # K's views moved too
    assert denoise.meta["qvla_inputs"].count("prefix") == 4
    assert torch.equal(program.run(inputs), want)
    exported = program.export(tuple(_obs(2)[0].values()) + (_obs(2)[1],))  # the saved form, batch dynamic
    pre = exported["prefix"].module()(*inputs[0].values())
    assert len(pre) == 4
    t = torch.zeros(3)
    policy = ToyPolicy(form)
    assert torch.equal(exported["denoise"].module()(tuple(pre), inputs[1], t),
                       policy.denoise_step(policy.embed_prefix(*inputs[0].values()), inputs[1], t))


@pytest.mark.parametrize("form", ["mask only", "time-scaled", "random", "in place"])
def test_cheap_time_dependent_and_random_values_stay_in_the_step(form):
    program = _program(ToyPolicy(form))
    before = {name: gm.code for name, gm in program.graphs.items()}
    assert hoist_invariants(program.graphs["prefix"], program.graphs["denoise"]) == []
    assert {name: gm.code for name, gm in program.graphs.items()} == before


def test_groot_cross_attention_keys_and_values_move_in_the_saved_program(tmp_path):
    import qvla_compiler

    policy, qp = quantized_policy("groot-tiny", "w8a8")
    cross = sum(block.cross for block in policy.action_head.transformer_blocks)
    kv = [h for h in qp.report.hoisted if not h.endswith(" per timestep")]  # the rest: table_time_values
    assert len(qp.program.graphs["prefix"].graph.find_nodes(op="output")[0].args[0]) == 3 + len(qp.report.hoisted)
    assert len(kv) == 2 * cross and qp.report.summary()["hoisted"] == list(qp.report.hoisted)
    assert all(h.endswith((".to_k)", ".to_v)")) for h in kv), kv  # says which linear
    for gm in qp.program.graphs.values():
        check_schedule(gm)  # the recorded schedules follow the move
    obs, noise = policy.example_inputs(3), policy.example_noise(3)
    float_prefix = capture_policy(build_policy("groot-tiny"), policy.example_inputs(), policy.example_noise())
    assert len(float_prefix["prefix"].graph.find_nodes(op="output")[0].args[0]) == 3
    loaded = qvla_compiler.load(qp.save(tmp_path / "groot.pt2"))
    kv = [k for ep in loaded.exported_programs.values() for k in {**ep.state_dict, **ep.constants} if ".to_" in k]
    assert len(kv) == len(set(kv)), "a moved weight is saved once, in the prefix program"
    assert loaded.report.hoisted == qp.report.hoisted  # `qvla inspect --json` shows them
    with torch.no_grad():
        got = loaded.module(compiled=False)(*obs.values(), noise)
    assert torch.equal(got, qp.program.run((obs, noise)))


def test_repeated_keys_move_unrepeated_and_the_step_repeats_them():
    program = _program(ToyPolicy("repeated"))
    inputs = _obs(3)
    want = program.run(inputs)
    assert len(hoist_invariants(program.graphs["prefix"], program.graphs["denoise"])) == 2
    returned = program.graphs["prefix"].graph.find_nodes(op="output")[0].args[0][-2:]  # contiguous copies
    assert [n.args[0].target for n in returned] == [torch.ops.aten.linear.default, torch.ops.aten.relu.default]
    assert all(n.meta["val"].shape[1:] == (3, 8) for n in returned)  # not the 6 repeated rows
    denoise = program.graphs["denoise"]
    assert len(denoise.graph.find_nodes(op="call_function", target=torch.ops.aten.expand.default)) == 2
    assert torch.equal(program.run(inputs), want)
