"""act_mode "per_step": the denoise step picks a calibrated static scale per flow step from its time input."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qvla_compiler
from policy_fixtures import policy_args, quantized_policy
from qvla_compiler.models.sampling import euler_sample
from qvla_compiler.inspect.summary import inspect_data
from qvla_compiler.plan import QuantPlan
from qvla_compiler.quant.step_scales import bucket_of, step_bounds

OBS = ("images", "tokens", "token_mask", "state")


@pytest.fixture(scope="module")
def perstep():
    return quantized_policy("pi05-tiny", "w8a8-perstep")


def _nodes(gm, op):
    return [n for n in gm.graph.nodes if str(n.target) == op]


def test_denoise_step_reads_one_scale_table_per_call_site_and_the_prefix_none(perstep):
    policy, qp = perstep
    steps = len(policy.schedule.timesteps)
    denoise, prefix = qp.program.graphs["denoise"], qp.program.graphs["prefix"]
    picks = _nodes(denoise, "qvla.step_scale.default")
    quantizes = _nodes(denoise, "qvla.quantize_act.default")
    assert picks and len(picks) == len(quantizes)  # every static scale of the denoise step is picked per step
    assert all(q.args[2] in picks for q in quantizes)
    tables = [getattr(denoise, p.args[0].target) for p in picks]
    assert all(t.shape == (steps,) for t in tables)
    assert torch.equal(denoise.qvla_step_bounds, step_bounds(policy.schedule.timesteps))
    assert any(float(t.max() / t.min()) > 1.05 for t in tables)  # the action head's range drifts with t
    assert not _nodes(prefix, "qvla.step_scale.default")
    assert not [n for n, _ in prefix.named_buffers() if n.endswith("_xs")]  # the prefix quantizes per token
    assert all(q.args[2] is None for q in _nodes(prefix, "qvla.quantize_act.default"))


def test_each_step_quantizes_with_its_own_table_entry(perstep):
    """Every qvla::step_scale the sampler runs returns table[bucket(t)] for the step's t, and quantize_act gets it."""
    policy, qp = perstep
    picks, quantized = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.qvla.step_scale.default:
                picks.append((args, out))
            elif func is torch.ops.qvla.quantize_act.default and len(args) > 2 and args[2] is not None \
                    and args[2].numel() > 1:  # (a dynamic call drops the default scale)
                quantized.append(args[2])
            return out

    with torch.no_grad(), Record():
        qp.module()(*policy_args(policy))
    steps = len(policy.schedule.timesteps)
    sites = len(_nodes(qp.program.graphs["denoise"], "qvla.step_scale.default"))
    assert len(picks) == steps * sites
    seen_times = set()
    for (table, bounds, t, rank), out in picks:
        assert torch.equal(out.reshape(-1), table[bucket_of(t, bounds)])
        seen_times.add(round(float(t[0]), 4))
    assert seen_times == {round(t, 4) for t in policy.schedule.timesteps}
    assert [id(q) for q in quantized] == [id(out) for _, out in picks]  # each picked scale is what quantize_act used


def test_per_step_program_saves_loads_and_replays_bit_identically(perstep, tmp_path):
    policy, qp = perstep
    qp.save(tmp_path / "p.pt2")
    qp.quant_plan.save(tmp_path / "plan")
    args = policy_args(policy)
    replay = qvla_compiler.quantize(policy, policy.example_inputs(), plan=tmp_path / "plan", progress=False)
    with torch.no_grad():
        want = qp.module()(*args)
        assert torch.equal(qvla_compiler.load(tmp_path / "p.pt2").module()(*args), want)
        assert torch.equal(replay.module()(*args), want)
    assert QuantPlan.load(tmp_path / "plan").step_bounds == pytest.approx(
        step_bounds(policy.schedule.timesteps).tolist())
    shown = {(r["graph"], r["act_scales"]) for r in inspect_data(tmp_path / "p.pt2")["linears"] if r["bits"] != "float"}
    assert shown == {("prefix", "dynamic"), ("denoise", f"per-step ×{len(policy.schedule.timesteps)}")}


def test_per_step_through_torch_compile_matches_the_aot_program(perstep):
    policy, qp = perstep
    be = qvla_compiler.backend(plan=copy.deepcopy(qp.quant_plan), inductor=False)
    denoise = torch.compile(policy.denoise_step, backend=be, fullgraph=True)
    prefix = torch.compile(policy.embed_prefix, backend=be)
    args = policy_args(policy)
    with torch.no_grad():
        got = euler_sample(prefix, denoise, dict(zip(OBS, args[:4])), args[4], policy.schedule)
        assert torch.equal(got, qp.module()(*args))
