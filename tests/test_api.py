"""End-to-end API: fidelity, exactness of layout none, integer execution, save/load, and named errors."""
import subprocess
import sys

import pytest
import torch

import qvla_compiler
from qvla_compiler.kernels import cpu_gemm
from policy_fixtures import policy_args, quantized_policy
from qvla_compiler.errors import ArtifactError, CalibrationError, ExportError, RecipeError


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_layout_none_is_bit_identical_to_eager(name):
    policy, qp = quantized_policy(name, "w8a8", "none")
    args = policy_args(policy)
    with torch.no_grad():
        eager = policy.sample_actions(*args[:4], noise=args[4])
    assert torch.equal(qp.module()(*args), eager)
    assert qp.report.int_linears == 0


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
@pytest.mark.parametrize("recipe,max_rel", [("w8a8", 0.03), ("w4a8", 0.2), ("w4a4", 0.6)])
def test_quantized_actions_stay_close(name, recipe, max_rel):
    _, qp = quantized_policy(name, recipe)
    assert qp.report.int_linears > 0
    assert 0 < qp.report.action_rel_l2 < max_rel
    assert all(r.sqnr_db is not None and r.sqnr_db > (25 if recipe == "w8a8" else 5)
               for r in qp.report.linears if r.bits != "float")


@pytest.mark.parametrize("name, recipe, fp32_rel", [("pi05-tiny", "quantvla-w4a8", None),
                                                     ("groot-tiny", "omega-w4a4", 0.0985)])
def test_a_bf16_policy_quantizes_as_well_as_fp32_and_stays_bf16(name, recipe, fp32_rel, tmp_path):
    """Full-size policies are built in bf16 (qvla quantize --dtype auto). DuQuant with ATM/OHB (pi05) and
    SVD·Hadamard with GPTQ at W4A4 (groot) on a bf16 policy give the fidelity of the fp32 build, each against its
    own float actions (pi05: measured here; groot: its fp32 build's, 0.0985 on 2026-12-05, to save a compile), the
    program holds no fp32 copy of a weight, and it saves and loads bit-identically."""
    from qvla_compiler.models import build_policy

    def quantize(dtype):
        policy = build_policy(name, dtype=dtype)
        qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=2, progress=False)
        return policy, qp

    fp32_rel = fp32_rel or quantize(torch.float32)[1].report.action_rel_l2
    policy, qp = quantize(torch.bfloat16)
    assert 0 < qp.report.action_rel_l2 < 1.25 * fp32_rel + 0.01, (qp.report.action_rel_l2, fp32_rel)
    tensors = [t for gm in qp.program.graphs.values() for t in (*gm.parameters(), *gm.buffers())]
    assert any(t.dtype == torch.bfloat16 for t in tensors) and any(t.dtype == torch.int8 for t in tensors)
    assert not [tuple(t.shape) for t in tensors if t.dtype == torch.float32 and t.numel() > 4096]  # scales only
    args = policy_args(policy)
    out = qp.module(compiled=False)(*args)
    loaded = qvla_compiler.load(qp.save(tmp_path / "bf16.pt2")).module(compiled=False)
    assert out.dtype == torch.float32 and torch.equal(loaded(*args), out)


def test_w8a8_program_runs_integer_matmuls(monkeypatch):
    """The W8A8 linears run qvla:: ops whose products are int8 x int8 -> int32 (torch._int_mm)."""
    policy, qp = quantized_policy("pi05-tiny", "w8a8")
    seen, real_int_mm = [], torch._int_mm

    def spy(a, b):
        out = real_int_mm(a, b)
        seen.append((a.dtype, b.dtype, out.dtype))
        return out

    monkeypatch.setattr(torch, "_int_mm", spy)
    monkeypatch.setattr(cpu_gemm, "backend", lambda: "int_mm")  # the fp32_exact backend is bit-identical
    gm_ops = [str(n.target) for gm in qp.program.graphs.values() for n in gm.graph.nodes if n.op == "call_function"]
    assert gm_ops.count("qvla.int8_linear.default") == qp.report.int_linears
    assert "aten.linear.default" in gm_ops  # float linears remain float
    qp.module()(*policy_args(policy, batch=2))
    steps = len(policy.schedule.timesteps)
    prefix_int = sum(r.graph == "prefix" and r.bits != "float" for r in qp.report.linears)
    denoise_int = qp.report.int_linears - prefix_int
    assert len(seen) == prefix_int + steps * denoise_int
    assert set(seen) == {(torch.int8, torch.int8, torch.int32)}


def test_save_then_load_in_a_fresh_interpreter_is_bit_identical(tmp_path):
    policy, qp = quantized_policy("groot-tiny", "w4a8")
    args = policy_args(policy, batch=3)
    path = qp.save(tmp_path / "groot.pt2")
    torch.save({"args": args, "out": qp.module()(*args)}, tmp_path / "io.pt")
    code = (f"import torch, qvla_compiler; d = torch.load({str(tmp_path / 'io.pt')!r}); "
            f"p = qvla_compiler.load({str(path)!r}); "
            "assert torch.equal(p.module()(*d['args']), d['out']); "
            "assert p.report.int_linears > 0 and p.meta['kind'] == 'policy'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no program"):
        qvla_compiler.load(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable"):
        qvla_compiler.load(tmp_path / "junk.pt2")
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(ep, tmp_path / "plain.pt2")
    with pytest.raises(ArtifactError, match="not a qvla_compiler"):
        qvla_compiler.load(tmp_path / "plain.pt2")


def test_recipe_errors():
    with pytest.raises(RecipeError, match="unknown recipe"):
        qvla_compiler.quantize(torch.nn.Linear(2, 2), (torch.randn(1, 2),), [], recipe="w3a3")
    with pytest.raises(RecipeError, match="unknown layout"):
        qvla_compiler.QuantRecipe("x", layout="most")


def test_calibration_errors():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    args = (torch.randn(2, 4),)
    with pytest.raises(CalibrationError, match="empty"):
        qvla_compiler.quantize(net, args, [], recipe="w8a8", layout="all", progress=False)
    with pytest.raises(CalibrationError, match="NaN"):
        qvla_compiler.quantize(net, args, [(torch.full((2, 4), float("nan")),)], recipe="w8a8", layout="all",
                               progress=False)


def test_export_error_names_the_module():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ExportError, match="'inner'"):
        qvla_compiler.quantize(Outer(), (torch.randn(2, 3),), [(torch.randn(2, 3),)], progress=False)


def test_plain_module_quantizes_and_matches_fake_quant_twin():
    """A module program (not a policy): the lowered graph equals a pure-torch fake-quant forward."""
    from qvla_compiler.quant.quantizers import dequantize_weight, fake_quant_act, quantize_weight
    from toy_models import ToyPolicyNet

    net = ToyPolicyNet().eval()
    x = torch.randn(2, 6, 8)
    qp = qvla_compiler.quantize(net, (x,), [(torch.randn(2, 6, 8),)], recipe="w4a8", layout="all", progress=False)

    def fq_linear(mod, inp, out):
        w = dequantize_weight(*quantize_weight(mod.weight, 4, 128), 4, mod.in_features, 128)
        return torch.nn.functional.linear(fake_quant_act(inp[0], 8), w, mod.bias)

    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(fq_linear)
    with torch.no_grad():
        torch.testing.assert_close(qp.module()(x), net(x), rtol=1e-4, atol=1e-4)


def test_a_batch_one_observation_quantizes_and_the_saved_program_takes_any_batch(tmp_path):
    policy = qvla_compiler.models.build_policy("pi05-tiny")
    obs = {k: v[:1] for k, v in policy.example_inputs().items()}
    qp = qvla_compiler.quantize(policy, obs, [obs], recipe="w8a8", progress=False)
    loaded = qvla_compiler.load(qp.save(tmp_path / "b1.pt2")).module()
    for batch in (1, 3):
        obs = {k: v[:1].expand(batch, *v.shape[1:]).clone() for k, v in policy.example_inputs().items()}
        noise = policy.example_noise(batch, seed=1)
        args = (*(obs[k] for k in ("images", "tokens", "token_mask", "state")), noise)
        assert torch.equal(loaded(*args), qp.module()(*args))


def test_a_module_without_linears_says_nothing_was_quantized():
    from torch import nn

    module = nn.Sequential(nn.LayerNorm(8), nn.GELU()).eval()
    qp = qvla_compiler.quantize(module, (torch.randn(2, 8),), [(torch.randn(2, 8),)], "w8a8", progress=False)
    assert qp.report.int_linears == 0
    assert any("no linear layer was found" in w and "einsum" in w for w in qp.report.warnings)


def test_aot_runners_are_fed_contiguous_tensors():
    """AOTInductor indexes its inputs with the example's (contiguous) strides unchecked: a chunk of the prefix (the
    tables of table_time_values) was read wrong until the runner got contiguous copies."""
    from qvla_compiler.kernels.native_cache import ContiguousInputs

    seen = []
    runner = ContiguousInputs(lambda prefix, x: seen.extend([*prefix, x]))
    base = torch.arange(24.0).view(2, 12)
    runner((base[:, :6], base.chunk(2, dim=1)[1]), base.t())
    assert all(t.is_contiguous() for t in seen)
    assert torch.equal(seen[1], base[:, 6:]) and torch.equal(seen[2], base.t())
