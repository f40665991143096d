"""Online rotation ops: `qvla::hadamard` (QuaRot/SpinQuant, quantvla.md §10) and `qvla::block_rotate` (DuQuant, §9.4).

Both transform the last dim of an activation and are registered with torch.library (CPU kernel + `register_fake`, so
torch.export keeps them as single nodes, and an autograd formula for x), each beside its dense pure-torch reference.

Self-describing in a saved program: the order-m Hadamard factor and the rotation blocks are tensor inputs, so the
online op always uses exactly the matrices the offline weight folding used, whatever version of the construction code
loads the program later.

There is no Triton kernel yet: the CPU implementation is the op's only backend (batched matmuls and a radix-2
butterfly in plain torch), so the kernel/autotune parts of the usual kernel-file layout are absent on purpose.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvla_compiler.errors import ShapeError
from qvla_compiler.quant.hadamard import hadamard_butterfly


def _check_hadamard(x: Tensor, had_m: Tensor | None, inner: int) -> None:
    width = x.shape[-1] if x.dim() else 0
    m = 1 if had_m is None else had_m.shape[0]
    if had_m is not None and (had_m.dim() != 2 or had_m.shape[0] != had_m.shape[1]):
        raise ShapeError(f"qvla::hadamard: had_m must be a square m×m matrix, got shape {tuple(had_m.shape)}")
    if not (isinstance(width, int) and isinstance(inner, int)):  # symbolic under export: checked at run time
        return
    p, rem = divmod(width, m * inner) if inner > 0 else (0, 1)
    if rem or p < 1 or p & (p - 1):
        raise ShapeError(
            f"qvla::hadamard: last dim {width} must be m·2^k·inner with m={m}, inner={inner}; "
            f"use hadamard_factors(n) to get m and pass its hadamard_base(m) as had_m."
        )


# ---- qvla::hadamard: y = scale · (H_m ⊗ H_{2^k} ⊗ I_inner) x on the last dim -------------------------------------


@torch.library.custom_op("qvla::hadamard", mutates_args=())
def hadamard(x: Tensor, had_m: Tensor | None, scale: float, inner: int = 1) -> Tensor:
    """Hadamard transform of the last dim: scale·(H_m ⊗ H_{2^k} ⊗ I_inner)·x for every vector x.

    had_m: the ±1 base matrix (None for pure powers of two); scale: usually 1/√(m·2^k); inner > 1 transforms across
    heads of a (heads, head_dim=inner) last dim.
    """
    _check_hadamard(x, had_m, inner)
    return (hadamard_butterfly(x, had_m, inner) * scale).contiguous()


@hadamard.register_fake
def _(x, had_m, scale, inner=1):
    _check_hadamard(x, had_m, inner)
    return x.new_empty(x.shape)  # contiguous whatever x's strides, as the kernel returns (Inductor asserts strides)


def _hadamard_backward(ctx, grad):
    # y = scale·H x  ⇒  dL/dx = scale·Hᵀ g, and Hᵀ = H_mᵀ ⊗ H_{2^k} ⊗ I (Sylvester is symmetric)
    (had_m,) = ctx.saved_tensors
    had_t = None if had_m is None else had_m.T.contiguous()
    return hadamard(grad, had_t, ctx.scale, ctx.inner), None, None, None


def _hadamard_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.scale, ctx.inner = inputs[2], inputs[3] if len(inputs) > 3 else 1


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def hadamard_ref(x: Tensor, had_m: Tensor | None, scale: float, inner: int = 1) -> Tensor:
    """Dense reference: x @ (H_m ⊗ Sylvester(2^k) ⊗ I_inner)ᵀ · scale."""
    m = 1 if had_m is None else had_m.shape[0]
    p = x.shape[-1] // (m * inner)
    syl = torch.ones(1, 1, dtype=x.dtype)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    base = torch.ones(1, 1, dtype=x.dtype) if had_m is None else had_m.to(x.dtype)
    full = torch.kron(torch.kron(base, syl), torch.eye(inner, dtype=x.dtype))
    return (x @ full.T) * scale


# ---- qvla::block_rotate: y = blockdiag(rot2) · gather(perm) · blockdiag(rot) on the last dim ---------------------


def _check_block_rotate(x: Tensor, rot: Tensor, perm: Tensor | None, rot2: Tensor | None) -> None:
    width = x.shape[-1] if x.dim() else -1
    for name, r in (("rot", rot), ("rot2", rot2)):
        if r is not None and (r.dim() != 3 or r.shape[1] != r.shape[2] or r.shape[0] * r.shape[1] != width):
            raise ShapeError(f"qvla::block_rotate: {name} must be [nblocks, B, B] with nblocks·B = {width}, "
                             f"got {tuple(r.shape)}")
    if perm is not None and (perm.shape != (width,) or perm.dtype != torch.int64):
        raise ShapeError(f"qvla::block_rotate: perm must be an int64 [{width}] index, got "
                         f"{perm.dtype} {tuple(perm.shape)}")


def _blockwise(x: Tensor, rot: Tensor) -> Tensor:
    nb, b, _ = rot.shape
    y = torch.bmm(x.reshape(-1, nb, b).transpose(0, 1), rot.to(x.dtype))  # [nb, T, B]: one batched GEMM
    return y.transpose(0, 1).reshape(x.shape)


@torch.library.custom_op("qvla::block_rotate", mutates_args=())
def block_rotate(x: Tensor, rot: Tensor, perm: Tensor | None = None, rot2: Tensor | None = None) -> Tensor:
    """DuQuant's online transform of the last dim: x ↦ ((x·R₁)[..., perm])·R₂, R₁/R₂ block-diagonal [nblocks, B, B].

    Row-vector convention: block b of the output is x[..., bB:(b+1)B] @ rot[b]. perm is a gather index
    (y[..., i] = z[..., perm[i]]); perm and rot2 are optional.
    """
    _check_block_rotate(x, rot, perm, rot2)
    y = _blockwise(x, rot)
    if perm is not None:
        y = y.index_select(-1, perm)
    if rot2 is not None:
        y = _blockwise(y, rot2)
    return y.contiguous()


@block_rotate.register_fake
def _(x, rot, perm=None, rot2=None):
    _check_block_rotate(x, rot, perm, rot2)
    return x.new_empty(x.shape)  # contiguous, as the kernel returns: empty_like kept a transposed input's strides


def _block_rotate_backward(ctx, grad):
    # y = x R₁ P R₂ (P a permutation matrix)  ⇒  dL/dx = g R₂ᵀ Pᵀ R₁ᵀ
    rot, perm, rot2 = ctx.saved_tensors
    g = grad if rot2 is None else _blockwise(grad, rot2.transpose(1, 2))
    if perm is not None:
        g = torch.zeros_like(g).index_copy_(-1, perm, g)
    return _blockwise(g, rot.transpose(1, 2)), None, None, None


def _block_rotate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


block_rotate.register_autograd(_block_rotate_backward, setup_context=_block_rotate_setup)


def block_rotate_ref(x: Tensor, rot: Tensor, perm: Tensor | None = None, rot2: Tensor | None = None) -> Tensor:
    """Dense reference: x @ blockdiag(rot) @ P @ blockdiag(rot2) with P[perm[i], i] = 1."""
    y = x @ torch.block_diag(*rot.to(x.dtype))
    if perm is not None:
        p = torch.zeros(x.shape[-1], x.shape[-1], dtype=x.dtype)
        p[perm, torch.arange(x.shape[-1])] = 1
        y = y @ p
    if rot2 is not None:
        y = y @ torch.block_diag(*rot2.to(x.dtype))
    return y
