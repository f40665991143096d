"""Attach the Triton launchers as the "cuda" implementation of the `qvla::` ops defined in `kernels/ops.py`.

The CPU implementations and schemas live in ops.py; this module only adds a CUDA kernel per op, and only when Triton
imports and the op is already defined, so a CPU-only install keeps working unchanged. Idempotent per namespace.
"""

import torch

_OP_NAMES = ("quantize_act", "int8_linear", "int4_linear", "bitplane_linear")
_registered: dict[str, list[str]] = {}
_libs: list = []  # keeps the registrations alive


def _cuda_impls():
    from qvla_compiler.kernels import triton_int4_linear, triton_int8_linear, triton_quantize_act

    def quantize_act(x, bits, static_scale=None):
        return triton_quantize_act.quantize_act(x, bits, static_scale)

    def int8_linear(xq, x_scale, w_q, w_scale, bias, out_dtype):
        return triton_int8_linear.int8_linear(xq, x_scale, w_q, w_scale, bias, out_dtype)

    def int4_linear(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype):
        return triton_int4_linear.int4_linear(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype)

    return {"quantize_act": quantize_act, "int8_linear": int8_linear, "int4_linear": int4_linear,
            "bitplane_linear": triton_int4_linear.bitplane_linear}


def _op_exists(namespace: str, name: str) -> bool:
    return hasattr(getattr(torch.ops, namespace), name)


def register_cuda_kernels(namespace: str = "qvla") -> list[str]:
    """Register the Triton kernels for every defined op of `namespace`; returns the qualified op names registered."""
    if namespace in _registered:
        return list(_registered[namespace])
    try:
        import triton  # noqa: F401
    except ImportError:
        return []
    impls = _cuda_impls()
    done = []
    for name in _OP_NAMES:
        if not _op_exists(namespace, name):
            continue
        qualname = f"{namespace}::{name}"
        lib = torch.library.Library(namespace, "FRAGMENT")
        torch.library.register_kernel(qualname, "cuda", impls[name], lib=lib)
        _libs.append(lib)
        done.append(qualname)
    _registered[namespace] = done
    return list(done)
