"""The float linears of a program run in bf16 when asked: weights stored in bf16, output dtype unchanged, close to
fp32; qvla:: integer ops untouched; and on a whole policy program the action fidelity barely moves."""
import torch

from qvla_compiler.lowering.float_dtype import cast_float_linears, native_bf16


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_cast_float_linears_stores_bf16_and_keeps_output_dtype():
    m = _Mlp().eval()
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        gm = torch.export.export(m, (x,)).module()
        want = gm(x)
        cast = cast_float_linears(gm)
        got = gm(x)
    assert len(cast) == 2
    assert all(p.dtype == torch.bfloat16 for p in gm.parameters())
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert isinstance(native_bf16(), bool)


def test_policy_program_fidelity_with_bf16_float_part():
    import qvla_compiler
    from qvla_compiler.models import build_policy

    policy = build_policy("pi05-tiny")
    obs, noise = policy.example_inputs(2), policy.example_noise(2)
    qp = qvla_compiler.quantize(policy, obs, policy.calibration_batches(2), recipe="w8a8", progress=False)
    with torch.no_grad():
        ref = policy.sample_actions(**obs, noise=noise)
        before = qp.module()(*obs.values(), noise)
        n_cast = sum(len(cast_float_linears(gm)) for gm in qp.program.graphs.values())
        after = qp.module()(*obs.values(), noise)
    assert n_cast > 0
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    print(f"action rel-L2 vs float: int8 + fp32 float part {rel(before):.4f}, int8 + bf16 float part {rel(after):.4f}")
    assert rel(after) < rel(before) + 0.02


def test_native_bf16_asks_for_the_instructions_not_onednn(monkeypatch):
    # oneDNN reports bf16 "supported" on AVX512 CPUs that only emulate it (Ice Lake): that is not native
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16() == (bf16 or amx)
