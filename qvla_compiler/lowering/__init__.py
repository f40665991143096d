"""Quantized linear → qvla:: op; optionally the float linears in bf16 (CPUs with native bf16); what every denoise
step recomputes from the prefix alone, into the prefix (hoist_invariants); for the compile paths, explicit softmax
attention → SDPA (fuse_attention)."""
from qvla_compiler.lowering.float_dtype import FLOAT_DTYPES, cast_float_linears, native_bf16
from qvla_compiler.lowering.hoist_invariants import hoist_invariants
from qvla_compiler.lowering.lower_linears import LOWERINGS, lower_linears
from qvla_compiler.lowering.table_time_values import table_time_values

__all__ = ["FLOAT_DTYPES", "LOWERINGS", "cast_float_linears", "hoist_invariants", "lower_linears", "native_bf16",
           "table_time_values"]
