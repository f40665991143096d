"""gelu_as_sigmoid: the tanh GELU becomes x·sigmoid(2u), as close to the exact function as aten's own fp32 GELU;
other GELUs stay; the compile paths rewrite only the copy they compile (`for_inductor`)."""
import pytest
import torch
import torch.nn.functional as F

from qvla_compiler.lowering.gelu_as_sigmoid import gelu_as_sigmoid
from qvla_compiler.lowering.inductor_forms import for_inductor
from tests.lowering.test_fuse_attention import Attention, _inputs, _sdpa_count

GELU, SIGMOID = torch.ops.aten.gelu.default, torch.ops.aten.sigmoid.default


class GatedMlp(torch.nn.Module):
    """Gemma's MLP shape: gelu(gate(x)) * up(x)."""

    def __init__(self, approximate="tanh"):
        super().__init__()
        self.gate, self.up, self.approximate = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), approximate

    def forward(self, x):
        return F.gelu(self.gate(x), approximate=self.approximate) * self.up(x)


class Gelu(torch.nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


def _count(gm, target):
    return len(gm.graph.find_nodes(op="call_function", target=target))


def _awkward_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(1 << 16, generator=gen) * 4, torch.linspace(-30, 30, 6001),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, 88.0, -88.0, 1e4, -1e4, 3e38, -3e38])])


def test_tanh_gelu_becomes_a_sigmoid_as_accurate_as_atens_gelu():
    x = _awkward_inputs()
    gm = torch.export.export(Gelu(), (x,)).module()
    assert gelu_as_sigmoid(gm) == 1 and _count(gm, GELU) == 0 and _count(gm, SIGMOID) == 1
    exact = F.gelu(x.double(), approximate="tanh")
    got, aten_fp32 = gm(x), F.gelu(x, approximate="tanh")
    assert not got.isnan().any()
    finite = exact.abs() < 1e30  # x³ overflows fp32 beyond ~7e12: both forms give x or −0 there
    assert (got.double() - exact)[finite].abs().max() <= 6e-7
    assert (aten_fp32.double() - exact)[finite].abs().max() <= 6e-7
    torch.testing.assert_close(got[~finite], aten_fp32[~finite])


def test_in_a_gated_mlp_the_values_match_and_other_gelus_stay():
    x = torch.randn(3, 5, 8)
    module = GatedMlp()
    gm = torch.export.export(module, (x,)).module()
    assert gelu_as_sigmoid(gm) == 1
    torch.testing.assert_close(gm(x), module(x), rtol=1e-6, atol=1e-6)
    erf = torch.export.export(GatedMlp("none"), (x,)).module()
    before = erf.code
    assert gelu_as_sigmoid(erf) == 0 and erf.code == before


@pytest.mark.parametrize("module, args, sdpa, sigmoid, rewritten", [
    (Attention(), _inputs(), 1, 0, True), (GatedMlp(), (torch.randn(2, 8),), 0, 1, True),
    (GatedMlp("none"), (torch.randn(2, 8),), 0, 0, True),  # its float linears' weights, transposed
    (torch.nn.GELU(), (torch.randn(2, 8),), 0, 0, False)], ids=["attention", "tanh gelu", "erf gelu", "nothing"])
def test_for_inductor_rewrites_a_copy_and_keeps_the_original(module, args, sdpa, sigmoid, rewritten):
    gm = torch.export.export(module, args).module()
    before = gm.code
    copy = for_inductor(gm)
    assert (copy is not gm) == rewritten
    assert _sdpa_count(copy) == sdpa and _count(copy, SIGMOID) == sigmoid
    assert gm.code == before
    torch.testing.assert_close(copy(*args), gm(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_program_compiles_the_sigmoid_form(dtype):
    """In bf16 Inductor computes the fused chain in fp32 and rounds once, as aten's bf16 GELU does."""
    from qvla_compiler.kernels.inductor import compile_program

    x = torch.randn(4, 8, dtype=dtype) * 3
    gm = torch.export.export(GatedMlp().to(dtype), (x,)).module()
    with torch.no_grad():
        compiled = compile_program(gm)
        got, want = compiled(x), gm(x)
    assert _count(compiled.module, SIGMOID) == 1 and _count(gm, GELU) == 1
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got, want, **tol)
