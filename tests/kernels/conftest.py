"""Kernel tests run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET=1 must be set before triton is first imported anywhere in the process: triton.language's own @jit
helpers (tl.max, tl.cdiv, ...) are built in the mode active at that first import, and a kernel interpreted on top of
compiled-mode helpers fails with "Cannot call @triton.jit'd outside of the scope of a kernel". Other test modules
(torch.compile / export tests) import triton indirectly, so this cannot wait for the kernel test modules themselves.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                           "run the kernel tests with TRITON_INTERPRET=1 in the environment on CPU-only machines")
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
