"""rotate_residual, QuaRot's residual-stream rotation R1 folded into the weights (recipe rotation "quarot").

Toy Before/Expected in float64 at a non-power-of-two width (H_12 ⊗ H_2, so the exit's H_mᵀ matters), a negative case
(a gated residual cannot fold), the float reference policies' actions kept within 1e-5 relative with and without
outliers, no online op left before the folded readers, observers re-calibrated on the rotated stream, and a measured
W4A4 action SQNR on pi05-tiny with outliers (printed, not compared)."""
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvla_compiler
from qvla_compiler.export import OBS_KEYS
from qvla_compiler.meta import info
from qvla_compiler.models import build_policy
from qvla_compiler.models.outliers import inject_outliers
from qvla_compiler.passes.check_schedule import check_schedule, compute_schedule
from qvla_compiler.passes.rotate_and_smooth import QuaRotFallbackWarning
from qvla_compiler.passes.rotate_common import observed_groups
from qvla_compiler.passes.rotate_residual import StreamRole, residual_tag
from qvla_compiler.recipes import RECIPES, QuantRecipe
from policy_fixtures import rotate_policy
from toy_models import rotate_toy

HADAMARD = "qvla.hadamard.default"
f64 = torch.float64


class ToyDecoder(nn.Module):
    """emb(ids) → 2 × [x + down(silu(gate(n))·up(n))·(g)], n = rms(x)·γ → LayerNorm (the stream's exit)."""

    def __init__(self, d: int = 24, h: int = 40, gated: bool = False, mix: bool = False, dropout: bool = False,
                 norm: str = "spelled"):
        super().__init__()
        self.norm = norm  # "spelled" out, "fused" (aten.rms_norm with the gain, as nn.RMSNorm), "fused_plain" (no gain)
        self.emb = nn.Embedding(32, d, dtype=f64)
        self.gains = nn.ParameterList(nn.Parameter(torch.rand(d, dtype=f64) + 0.5) for _ in range(2))
        for gain in self.gains:
            gain.data[:3] *= 50.0  # outlier channels
        self.gate = nn.ModuleList(nn.Linear(d, h, bias=False, dtype=f64) for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(d, h, bias=False, dtype=f64) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(h, d, dtype=f64) for _ in range(2))
        self.res_gate = nn.Parameter(torch.rand(d, dtype=f64)) if gated else None
        self.mix = nn.Linear(d, d, dtype=f64) if mix else None  # reads and writes the stream: not folded
        self.out = nn.LayerNorm(d, dtype=f64)
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()  # Phi-3's resid dropout: eval mode, folds

    def forward(self, ids):
        x = self.emb(ids)
        if self.mix is not None:
            x = x + self.mix(x)
        for i in range(2):
            if self.norm == "spelled":
                n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gains[i]
            elif self.norm == "fused":
                n = F.rms_norm(x, (x.shape[-1],), self.gains[i], 1e-6)
            else:
                n = F.rms_norm(x, (x.shape[-1],), None, 1e-6) * self.gains[i]
            y = self.drop(self.down[i](F.silu(self.gate[i](n)) * self.up[i](n)))
            x = x + (y if self.res_gate is None else y * self.res_gate)  # a per-channel gate: not foldable
        return self.out(x)


def _toy(gated=False, layout="all", mix=False, dropout=False, norm="spelled"):
    torch.manual_seed(0)
    model = ToyDecoder(gated=gated, mix=mix, dropout=dropout, norm=norm).eval()
    batches = [(torch.randint(0, 32, (2, 5)),) for _ in range(2)]
    gm, before, code = rotate_toy(model, batches, QuantRecipe("t", layout=layout, rotation="quarot"))
    return model, gm, before, code, batches[0][0]


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _roles(gm) -> dict[StreamRole, int]:
    roles = [residual_tag(n).role for n in gm.graph.nodes if residual_tag(n) is not None]
    return {r: roles.count(r) for r in StreamRole if r in roles}


@pytest.mark.parametrize("dropout, norm", [(False, "spelled"), (True, "spelled"), (False, "fused"),
                                           (False, "fused_plain")])
def test_toy_stream_folds_exactly_with_one_exit(dropout, norm):
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuaRotFallbackWarning)
        model, gm, before, _, ids = _toy(dropout=dropout, norm=norm)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), rtol=1e-10, atol=1e-10)
    assert compute_schedule(gm) == before  # only qvla::hadamard was added
    roles = {r.value: n for r, n in _roles(gm).items() if r is not StreamRole.MEMBER}
    assert roles == {"entry": 1, "reader": 4, "writer": 2, "gain": 2, "exit": 1}  # emb; gate/up; down; LayerNorm
    # online: the two down-projection inputs (per-input pair) and the un-rotation before the LayerNorm
    assert _ops(gm).count(HADAMARD) == 3
    exit_op = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.layer_norm.default)
    assert str(exit_op.args[0].target) == HADAMARD
    rotations = {info(n).module_path.split(".")[0]: info(n).rotation for n in gm.graph.nodes if info(n) is not None}
    assert rotations == {"gate": "quarot", "up": "quarot", "down": "hadamard"}
    for node in gm.graph.nodes:  # the norm gains now read identity buffers
        if residual_tag(node) is not None and residual_tag(node).role is StreamRole.GAIN:
            gain = next(a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")
            assert torch.equal(getattr(gm, gain.target), torch.ones(24, dtype=f64))


@pytest.mark.parametrize("case", ["gated", "mix"])
def test_toy_unfoldable_stream_keeps_per_input_pairs(case):
    with pytest.warns(QuaRotFallbackWarning, match="no foldable residual stream"):
        model, gm, before, _, ids = _toy(gated=case == "gated", mix=case == "mix")
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), rtol=1e-10, atol=1e-10)
    assert _roles(gm) == {}
    assert {info(n).rotation for n in gm.graph.nodes if info(n) is not None} == {"hadamard"}
    assert _ops(gm).count(HADAMARD) == 4 + (case == "mix")  # every group keeps its per-input pair


def test_toy_without_quantized_readers_is_unchanged():
    _, gm, _, code, _ = _toy(layout="none")  # Expected = Before
    assert gm.code == code and _roles(gm) == {}


@functools.lru_cache(maxsize=None)
def _float_program(name: str, rotation: str, outliers: bool):
    """Phases 1, 2, 2b of the pipeline (layout quantvla, no quantization); observers left in, re-calibrated."""
    policy = build_policy(name)
    if outliers:
        inject_outliers(policy)
    program, obs, noise = rotate_policy(policy, QuantRecipe("t", rotation=rotation))
    return program, policy, obs, noise


def _online_before(linear) -> bool:
    """Whether a qvla::hadamard feeds this linear's input through observers and casts."""
    node = linear.args[0]
    while node.op == "call_module" or str(node.target).startswith(("aten.type_as", "aten.to.")):
        node = node.args[0]
    return str(node.target) == HADAMARD


@pytest.mark.parametrize("name,outliers", [
    ("pi05-tiny", False), ("pi05-tiny", True), ("groot-tiny", False), ("groot-tiny", True),
    pytest.param("pi05-small", True, marks=pytest.mark.small), pytest.param("groot-small", True, marks=pytest.mark.small),
])
def test_quarot_preserves_float_actions(name, outliers):
    program, policy, obs, noise = _float_program(name, "quarot", outliers)
    ref = policy.sample_actions(*(obs[k] for k in OBS_KEYS), noise=noise)
    out = program.run((obs, noise))
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-5, f"{name} quarot: actions moved by {rel:.2e} relative"
    prefix = program.graphs["prefix"]
    q_proj = next(n for n in prefix.graph.nodes if info(n) is not None and info(n).module_path.endswith(
        "language_model.layers.0.self_attn.q_proj"))
    folded = getattr(prefix, q_proj.args[1].target)
    assert not torch.equal(folded, policy.language_model.layers[0].self_attn.q_proj.weight)
    for gm in program.graphs.values():  # rotations only as qvla:: ops or folded weights
        check_schedule(gm)


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_folded_stream_leaves_no_online_op_before_readers(name):
    counts = {}
    for rotation in ("hadamard", "quarot"):
        gm = _float_program(name, rotation, False)[0].graphs["prefix"]
        readers = [n for n in gm.graph.nodes if info(n) is not None and info(n).is_quantized
                   and info(n).module_path.startswith("language_model.layers")
                   and info(n).role.value in ("attn_q", "attn_k", "attn_v", "mlp") and info(n).mlp_part != "down"]
        assert len(readers) == 10  # 2 layers × (q, k, v, gate, up)
        online = [_online_before(n) for n in readers]
        assert all(online) if rotation == "hadamard" else not any(online), rotation
        assert {info(n).rotation for n in readers} == {rotation}
        counts[rotation] = _ops(gm).count(HADAMARD)
        exits = sum(residual_tag(n) is not None and residual_tag(n).role is StreamRole.EXIT for n in gm.graph.nodes)
    # per-input: 4 groups per layer; folded: o_proj and down_proj per layer, plus one un-rotation at the stream's exit
    assert counts == {"hadamard": 8, "quarot": 4 + exits} and exits == 1
    assert _ops(_float_program(name, "quarot", False)[0].graphs["denoise"]).count(HADAMARD) == \
        _ops(_float_program(name, "hadamard", False)[0].graphs["denoise"]).count(HADAMARD)  # action head untouched


def test_observers_see_the_rotated_stream():
    def spread(rotation):  # max / median of the layer-0 q/k/v input's per-channel absmax after re-calibration
        gm = _float_program("pi05-tiny", rotation, True)[0].graphs["prefix"]
        obs = next(o for _, o, lins in observed_groups(gm)
                   if info(lins[0]).module_path == "language_model.layers.0.self_attn.q_proj")
        return float(obs.channel_absmax.max() / obs.channel_absmax.median())
    assert spread("none") > 10  # the injected outlier channels (×20–100) …
    assert spread("hadamard") < 10 and spread("quarot") < 10  # … are spread out by either rotation
    program = _float_program("pi05-tiny", "quarot", True)[0]
    assert all(o.calls > 0 for gm in program.graphs.values() for _, o, _ in observed_groups(gm))


def test_quarot_w4a4_runs_and_reports_sqnr(capsys):
    policy = inject_outliers(build_policy("pi05-tiny"))
    recipe = RECIPES["w4a4"].with_(name="w4a4-quarot", rotation="quarot")
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=2, progress=False)
    sqnr = qp.report.action_sqnr_db
    with capsys.disabled():
        print(f"\npi05-tiny + outliers, W4A4, rotation quarot: action SQNR {sqnr:.2f} dB")
    assert math.isfinite(sqnr)
    for gm in qp.program.graphs.values():
        check_schedule(gm)
    assert HADAMARD in _ops(qp.program.graphs["prefix"])
