"""Importing this package registers every `qvla::` op (CPU integer implementations, and the Triton CUDA
kernels when Triton and a GPU are available)."""
from qvla_compiler.kernels import ops  # noqa: F401 — registers qvla::quantize_act / int8_linear / int4_linear
from qvla_compiler.kernels import rotate_ops  # noqa: F401,E402 — registers qvla::hadamard / qvla::block_rotate
