"""Quantized linear → qvla:: op."""
from qvla_compiler.lowering.lower_linears import LOWERINGS, lower_linears

__all__ = ["LOWERINGS", "lower_linears"]
