"""Quantized linear → qvla:: op; optionally the float linears in bf16 (CPUs with native bf16); for the compile paths,
explicit softmax attention → SDPA (fuse_attention)."""
from qvla_compiler.lowering.float_dtype import FLOAT_DTYPES, cast_float_linears, native_bf16
from qvla_compiler.lowering.lower_linears import LOWERINGS, lower_linears

__all__ = ["FLOAT_DTYPES", "LOWERINGS", "cast_float_linears", "lower_linears", "native_bf16"]
