"""Importing this package registers every `qvla::` op (CPU integer implementations, and the Triton CUDA
kernels when Triton and a GPU are available)."""
from qvla_compiler.kernels import ops  # noqa: F401 — registers qvla::quantize_act / int8_linear / int4_linear
from qvla_compiler.kernels import rotate_ops  # noqa: F401,E402 — registers qvla::hadamard / qvla::block_rotate
from qvla_compiler.kernels import step_scale  # noqa: F401,E402 — registers qvla::step_scale


def _register_gpu_kernels() -> None:
    """Attach the Triton kernels as the CUDA implementation of the qvla:: ops when Triton is installed."""
    import torch

    if not torch.cuda.is_available():  # importing Triton early would pin it out of interpreter mode in tests
        return
    try:
        from qvla_compiler.kernels.triton_registry import register_cuda_kernels
    except ImportError:  # no Triton: the CPU integer kernels serve every device we can run on
        return
    register_cuda_kernels()


_register_gpu_kernels()
