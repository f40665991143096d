"""patch_convs_as_gemms: a patch-embedding conv2d (stride = kernel, no padding) becomes one GEMM over the patches,
with the same values, on images its patches do and do not tile; every other convolution stays."""
import pytest
import torch

from qvla_compiler.kernels.inductor import compile_program
from qvla_compiler.lowering.patch_convs_as_gemms import patch_convs_as_gemms

aten = torch.ops.aten


class PatchEmbed(torch.nn.Module):
    def __init__(self, kernel=(8, 8), bias=True, **conv):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 18, kernel_size=kernel, bias=bias, **{"stride": kernel, **conv})

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)  # [B, patches, width], as ViT / SigLIP read it


def _convs(gm):
    return len(gm.graph.find_nodes(op="call_function", target=aten.conv2d.default))


@pytest.mark.parametrize("size, kernel, bias", [((32, 32), (8, 8), True), ((30, 37), (8, 8), True),
                                                ((24, 40), (4, 8), False)],
                         ids=["tiled", "partial patches dropped", "rectangular, no bias"])
def test_patch_embeddings_become_one_gemm_with_the_same_values(size, kernel, bias):
    x = torch.randn(3, 3, *size)
    module = PatchEmbed(kernel, bias)
    gm = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    assert patch_convs_as_gemms(gm) == 1 and _convs(gm) == 0
    assert "conv.weight" not in dict(gm.named_parameters())  # the [N, C, P, Q] filters: replaced, not copied
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x[:1]), module(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=(4, 4)), dict(dilation=2), dict(groups=3)],
                         ids=["padded", "overlapping", "dilated", "grouped"])
def test_other_convolutions_stay(conv):
    module = PatchEmbed((8, 8), **conv)
    gm = torch.export.export(module, (torch.randn(2, 3, 48, 48),)).module()
    assert patch_convs_as_gemms(gm) == 0 and _convs(gm) == 1


def test_the_compiled_copy_matches_and_the_saved_graph_keeps_its_conv():
    x, module = torch.randn(2, 3, 32, 32), PatchEmbed()
    gm = torch.export.export(module, (x,)).module()
    with torch.no_grad():
        compiled = compile_program(gm)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    assert _convs(gm) == 1 and _convs(compiled.module) == 0
