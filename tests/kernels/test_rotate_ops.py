"""qvla::hadamard and qvla::block_rotate against their dense references, opcheck, export, autograd."""

import math

import pytest
import torch

from qvla_compiler.quant.duquant import calibrate_duquant
from qvla_compiler.errors import ShapeError
from qvla_compiler.quant.hadamard import fast_hadamard, hadamard_base, hadamard_factors, hadamard_matrix
from qvla_compiler.kernels.rotate_ops import block_rotate, block_rotate_ref, hadamard, hadamard_ref

SHAPES = [(1, 48), (3, 96), (2, 5, 384), (7, 1536), (1, 1, 6144), (4, 4096), (50, 60)]


def _had_args(n, dtype=torch.float64):
    m, _ = hadamard_factors(n)
    return (hadamard_base(m).to(dtype) if m > 1 else None), 1 / math.sqrt(n)


def _orthogonal_blocks(nb, b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(nb, b, b, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_hadamard_op_matches_reference(shape):
    x = torch.randn(shape, dtype=torch.float64)
    had, scale = _had_args(shape[-1])
    y = torch.ops.qvla.hadamard(x, had, scale)
    if shape[-1] <= 1536:  # the dense reference builds an n×n matrix
        torch.testing.assert_close(y, hadamard_ref(x, had, scale), atol=1e-11, rtol=0)
    torch.testing.assert_close(y, fast_hadamard(x), atol=1e-11, rtol=0)


def test_hadamard_op_across_heads_and_float32():
    x = torch.randn(3, 16 * 96)  # 16 heads of 96: transform across heads only
    y = torch.ops.qvla.hadamard(x, None, 0.25, 96)
    torch.testing.assert_close(y, hadamard_ref(x, None, 0.25, 96), atol=1e-5, rtol=1e-5)  # fp32 sums of 16 terms
    had = hadamard_base(12).float()
    x = torch.randn(2, 12 * 4 * 8)  # 12 heads of 32 with an inner factor of 8
    torch.testing.assert_close(torch.ops.qvla.hadamard(x, had, 0.5, 8), hadamard_ref(x, had, 0.5, 8), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("n,had_m,inner", [(100, None, 1), (96, hadamard_base(20), 1), (96, None, 5)])
def test_hadamard_op_rejects_bad_shapes(n, had_m, inner):
    with pytest.raises(ShapeError):
        torch.ops.qvla.hadamard(torch.randn(2, n), had_m, 1.0, inner)


def _looped_ref(x, rot, perm, rot2):  # one block at a time: the obvious (slow) semantics, no n×n matrices
    def blocks(z, r):
        b = r.shape[-1]
        return torch.cat([z[..., i * b:(i + 1) * b] @ r[i] for i in range(r.shape[0])], -1)

    y = blocks(x, rot)
    y = y if perm is None else y[..., perm]
    return y if rot2 is None else blocks(y, rot2)


@pytest.mark.parametrize("shape,b", [((2, 96), 32), ((3, 2, 384), 128), ((5, 1536), 128), ((1, 6144), 64),
                                     ((4, 48), 48), ((50, 60), 12)], ids=str)
def test_block_rotate_matches_reference(shape, b):
    d = shape[-1]
    x = torch.randn(shape, dtype=torch.float64)
    rot, rot2 = _orthogonal_blocks(d // b, b, 0), _orthogonal_blocks(d // b, b, 1)
    perm = torch.randperm(d)
    for args in [(rot, None, None), (rot, perm, None), (rot, None, rot2), (rot, perm, rot2)]:
        y = torch.ops.qvla.block_rotate(x, *args)
        torch.testing.assert_close(y, _looped_ref(x, *args) if d > 384 else block_rotate_ref(x, *args), atol=1e-12,
                                   rtol=0)
    z = torch.ops.qvla.block_rotate(x, rot, perm, rot2)  # orthogonal ⇒ norms preserved
    torch.testing.assert_close(z.norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=0)


def test_block_rotate_equals_duquant_transform():
    x, w = torch.randn(64, 384, dtype=torch.float64), torch.randn(16, 384, dtype=torch.float64)
    t = calibrate_duquant(x, w, block=128, steps=4, alpha=None)
    torch.testing.assert_close(torch.ops.qvla.block_rotate(x, t.rot1, t.perm, t.rot2), t.apply_to_activation(x),
                               atol=1e-12, rtol=0)


def test_block_rotate_rejects_bad_shapes():
    x = torch.randn(2, 96)
    with pytest.raises(ShapeError):
        torch.ops.qvla.block_rotate(x, torch.randn(2, 32, 32))
    with pytest.raises(ShapeError):
        torch.ops.qvla.block_rotate(x, torch.randn(3, 32, 32), torch.arange(96, dtype=torch.int32))


def test_opcheck_both_ops():
    had = hadamard_base(12)
    for x in [torch.randn(3, 48), torch.randn(2, 4, 1536)]:
        torch.library.opcheck(torch.ops.qvla.hadamard.default, (x, had.float(), 1 / math.sqrt(x.shape[-1])))
    torch.library.opcheck(torch.ops.qvla.hadamard.default, (torch.randn(2, 64), None, 0.125, 4))
    rot = _orthogonal_blocks(3, 32).float()
    x = torch.randn(5, 96)
    torch.library.opcheck(torch.ops.qvla.block_rotate.default, (x, rot, torch.randperm(96), rot.flip(0)))
    torch.library.opcheck(torch.ops.qvla.block_rotate.default, (x, rot, None, None))


def test_autograd_is_the_transpose():
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    had, scale = _had_args(96)
    g = torch.randn(3, 96, dtype=torch.float64)
    torch.ops.qvla.hadamard(x, had, scale).backward(g)
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(96), atol=1e-12, rtol=0)
    x.grad = None
    rot, perm = _orthogonal_blocks(3, 32), torch.randperm(96)
    torch.ops.qvla.block_rotate(x, rot, perm, rot).backward(g)
    dense = block_rotate_ref(torch.eye(96, dtype=torch.float64), rot, perm, rot)
    torch.testing.assert_close(x.grad, g @ dense.T, atol=1e-12, rtol=0)


def test_export_keeps_ops_as_single_nodes():
    class Rotate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("had", hadamard_base(12))
            self.register_buffer("rot", _orthogonal_blocks(12, 128).float())
            self.register_buffer("perm", torch.randperm(1536))

        def forward(self, x):
            y = torch.ops.qvla.hadamard(x, self.had.to(x.dtype), 1 / math.sqrt(1536))
            return torch.ops.qvla.block_rotate(y, self.rot, self.perm, self.rot)

    x, mod = torch.randn(2, 5, 1536), Rotate()
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.qvla.hadamard.default in targets and torch.ops.qvla.block_rotate.default in targets
    torch.testing.assert_close(ep.module()(x), mod(x))
    dyn = torch.export.export(mod, (x,), dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("t")},))
    x2 = torch.randn(3, 7, 1536)
    torch.testing.assert_close(dyn.module()(x2), mod(x2))


def test_fake_kernels_give_the_real_strides_on_a_transposed_input():
    """Inductor asserts every custom op's output strides against its fake kernel. The fakes returned empty_like(x),
    which keeps a transposed input's strides, while the kernels return contiguous tensors: torch.compile(backend=
    "qvla") on nn.MultiheadAttention under DuQuant failed with 'expected ... stride 64==32'."""
    from qvla_compiler.kernels.ops import quantize_act

    x = torch.randn(6, 2, 32).transpose(0, 1)  # [2, 6, 32], not contiguous: MHA's [T, B, E] ↔ [B, T, E]
    rot = torch.linalg.qr(torch.randn(4, 8, 8))[0]
    cases = [(block_rotate, (x, rot, torch.randperm(32), rot)), (hadamard, (x, None, 32 ** -0.5)),
             (quantize_act, (x, 8, None))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))
