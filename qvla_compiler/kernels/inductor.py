"""Make the `qvla::` integer program compile: Inductor/AOTInductor decompositions of the qvla:: ops on CPU.

The ops stay opaque custom ops in the saved program (one schema, CPU integer kernels, Triton kernels for CUDA). When
a program is compiled with Inductor (`compile_program`, or any `torch.compile` after `register()`), each op on a CPU
tensor is decomposed into aten primitives that Inductor fuses with its neighbours:

* quantize_act -> abs / amax / div / round / clamp / cast: one fused reduction + pointwise kernel, which Inductor
  merges into the producer of x (the layer norm, the GELU, the residual add before it);
* int8_linear  -> the exact integer GEMM of `cpu_gemm.backend()` (`_int_mm` on AVX512-VNNI/AMX, which Inductor may
  turn into oneDNN's quantized linear; on AVX2 the int8 operands as fp32 in K chunks of <= 1024, every partial sum an
  exactly represented integer), then acc * x_scale * w_scale + bias as one fused epilogue;
* int4_linear, bitplane_linear -> the unpack of the nibbles or bit-planes (a constant under freezing: done once at
  compile time, never per call), then the same GEMM per K-group (one batched GEMM, each group's sum an exact
  integer) and the per-group scales summed in the fused epilogue.

The decompositions compute exactly what the eager CPU kernels compute (same integer accumulators, same float
epilogue order), so the compiled program equals the eager one; the tests assert it against the *_ref semantics.
On any other device the decomposition declines (returns NotImplemented) and the op's own kernel runs (Triton on CUDA).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from qvla_compiler.kernels import cpu_gemm
from qvla_compiler.kernels.ops import quantize_act_ref, unpack_bitplanes, unpack_int4


def _cpu(*tensors) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """torch._int_mm(a, b_t.T) in a compiled graph. An activation with one row (M = 1, e.g. a state encoder at batch
    1) is padded to two: Inductor gives a size-1 dim stride 0, which `_int_mm` on CPU reads as a leading dimension
    of 0 and returns garbage (values ~5e8 that change from call to call; RESULTS §1c; upstream: pytorch/pytorch#195066,
    open as of torch 2.13). The weight operand is made contiguous outside Inductor's layout choice (a frozen
    constant, or computed with real strides): one output column was tested and needs no pad."""
    m = a.shape[0]
    a = torch.nn.functional.pad(a, (0, 0, 0, 1)) if m == 1 else a
    return torch._int_mm(a.contiguous(), b_t.t().contiguous())[:m]


def _int_acc_as_float(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] @ int8 [N, K]^T as fp32 holding the integer accumulator (the value `acc.float()` has in the
    eager kernel), written with aten ops Inductor can lower."""
    k = a.shape[1]
    if cpu_gemm.backend() == "int_mm":
        if k <= cpu_gemm.max_exact_k():
            return _int_mm(a, b_t).float()
        acc = None
        for start, stop in cpu_gemm.k_chunks(k, cpu_gemm.max_exact_k()):
            part = _int_mm(a[:, start:stop], b_t[:, start:stop]).long()
            acc = part if acc is None else acc + part
        return acc.float()
    chunks = cpu_gemm.k_chunks(k, cpu_gemm.EXACT_CHUNK)
    if len(chunks) == 1:  # the fp32 product of one chunk is the exact integer: no int round trip needed
        return a.float() @ b_t.float().t()
    acc_dtype = torch.int32 if k <= cpu_gemm.max_exact_k() else torch.int64
    acc = None
    for start, stop in chunks:
        part = (a[:, start:stop].float() @ b_t[:, start:stop].float().t()).to(acc_dtype)
        acc = part if acc is None else acc + part
    return acc.float()


def quantize_act_decomp(x, bits, static_scale=None):
    if not _cpu(x, static_scale) or bits not in (4, 8):
        return NotImplemented
    return quantize_act_ref(x, bits, static_scale)


def int8_linear_decomp(xq, x_scale, w_q, w_scale, bias, out_dtype):
    if not _cpu(xq, x_scale, w_q, w_scale, bias) or xq.shape[-1] != w_q.shape[1] or xq.numel() == 0:
        return NotImplemented
    k, lead = xq.shape[-1], xq.shape[:-1]
    # w_scale · (acc · x_scale): the eager kernel's product, but not the shape of Inductor's smooth-quant _int_mm
    # pattern, which would swap in onednn::qlinear_pointwise for the signed activations (1.2 s a call on average over
    # groot-small's prefix GEMMs, M = 129, on an AVX512-VNNI EPYC without AMX: 600× the fp32 prefix, RESULTS §1b)
    out = w_scale * (_int_acc_as_float(xq.reshape(-1, k), w_q) * x_scale.reshape(-1, 1))
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, w_q.shape[0]).to(out_dtype)


def int4_linear_decomp(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype):
    k = xq.shape[-1]
    if not _cpu(xq, x_scale, w_packed, w_scale, bias) or (k + 1) // 2 != w_packed.shape[1] or xq.numel() == 0:
        return NotImplemented
    # constant-folded under freezing: unpacked once, at compile time
    return _grouped_decomp(xq, x_scale, unpack_int4(w_packed, k), w_scale, bias, group_size, out_dtype)


def bitplane_linear_decomp(xq, x_scale, w_planes, w_scale, bias, bits, group_size, out_dtype):
    k = xq.shape[-1]
    if not _cpu(xq, x_scale, w_planes, w_scale, bias) or w_planes.shape[1:] != (bits, -(-k // 8)) or xq.numel() == 0:
        return NotImplemented
    return _grouped_decomp(xq, x_scale, unpack_bitplanes(w_planes, bits, k), w_scale, bias, group_size, out_dtype)


def _grouped_decomp(xq, x_scale, w, w_scale, bias, group_size, out_dtype):
    """ops._grouped_linear in aten ops Inductor lowers, on the unpacked int8 weight w [N, K]."""
    k, lead, n = xq.shape[-1], xq.shape[:-1], w.shape[0]
    x = xq.reshape(-1, k)
    if w_scale.shape[1] == 1:
        out = w_scale[:, 0] * _int_acc_as_float(x, w)  # operands swapped: see int8_linear_decomp
    elif group_size > cpu_gemm.EXACT_CHUNK or cpu_gemm.backend() == "int_mm":
        groups = [_int_acc_as_float(x[:, s:s + group_size], w[:, s:s + group_size]) for s in range(0, k, group_size)]
        out = (torch.stack(groups) * w_scale.t()[:, None, :]).sum(0)
    else:  # one batched fp32 GEMM over the groups; every group sum (<= 1024 terms) is an exact integer
        n_groups = -(-k // group_size)
        pad = n_groups * group_size - k
        xa = torch.nn.functional.pad(x, (0, pad)).float().reshape(x.shape[0], n_groups, group_size).transpose(0, 1)
        wb = torch.nn.functional.pad(w, (0, pad)).float().reshape(n, n_groups, group_size).permute(1, 2, 0)
        out = (torch.bmm(xa, wb) * w_scale.t()[:, None, :]).sum(0)
    out = out * x_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, n).to(out_dtype)


DECOMPOSITIONS = {
    "quantize_act": quantize_act_decomp,
    "int8_linear": int8_linear_decomp,
    "int4_linear": int4_linear_decomp,
    "bitplane_linear": bitplane_linear_decomp,
}


@functools.lru_cache(maxsize=1)
def register() -> tuple[str, ...]:
    """Add the CPU decompositions to Inductor's table (idempotent). Imports Inductor (seconds), so it runs only when
    a program is compiled, never on `import qvla_compiler`."""
    from torch._inductor import decomposition

    done = []
    for name, fn in DECOMPOSITIONS.items():
        decomposition.decompositions[getattr(torch.ops.qvla, name).default] = fn
        done.append(f"qvla::{name}")
    # Inductor reads a cached copy of the table, made at the process's first compile: after any earlier
    # torch.compile the ops would stay opaque (an unfused program) without dropping that copy
    decomposition.fast_random_decomps.cache_clear()
    return tuple(done)


class CompiledProgram(torch.nn.Module):
    """A torch.compile'd program that traces and runs under its Inductor settings. Freezing is read by Dynamo when
    it traces (to treat the weights as constants), which happens at the first call and at every recompilation, not
    at `torch.compile` time, so the setting is applied around each call."""

    def __init__(self, module: torch.nn.Module, compiled, config: dict):
        super().__init__()
        self.module = module  # keeps the weights (and their integer form) owned here
        self._compiled, self._config = compiled, config

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self._config), torch.no_grad():
            return self._compiled(*args, **kwargs)


def compile_program(module: torch.nn.Module, *, freezing: bool = True, dynamic: bool | None = None,
                    options: dict | None = None) -> CompiledProgram:
    """torch.compile a qvla program (a loaded `.pt2`'s module, a lowered graph) with Inductor and the qvla
    decompositions, for inference (no_grad). `freezing` makes the weights constants: Inductor folds the integer
    weights' conversions (int4 unpack, int8 -> fp32 GEMM operand) once, at compile time, and prepacks the GEMM
    operands (4 bytes a weight resident instead of 1 or 0.5); `freezing=False` keeps only the integer weights
    resident and converts them inside the compiled kernels at every call."""
    from qvla_compiler.lowering.inductor_forms import for_inductor

    register()
    if isinstance(module, torch.fx.GraphModule):
        module = for_inductor(module)  # e.g. explicit softmax attention as SDPA: the compiled copy only
    config = {"freezing": freezing, **(options or {})}
    return CompiledProgram(module, torch.compile(module, backend="inductor", dynamic=dynamic), config)


COMPILE_MODES = ("eager", "jit", "aot")


def compile_mode(compiled: bool | str | None = None) -> str:
    """How `module(compiled)` runs: False -> "eager", True -> "jit" (Inductor in this process), "aot" (AOTInductor
    packages, cached on disk: kernels/native_cache.py). None reads QVLA_COMPILE: 0/false/off/no -> "eager", aot ->
    "aot", anything else (or unset) -> "jit"."""
    if compiled is None:
        env = os.environ.get("QVLA_COMPILE", "1").strip().lower()
        return "eager" if env in ("0", "false", "off", "no") else "aot" if env == "aot" else "jit"
    if isinstance(compiled, bool):
        return "jit" if compiled else "eager"
    if compiled not in COMPILE_MODES:
        from qvla_compiler.errors import UsageError

        raise UsageError(f"module(compiled={compiled!r}): choose True, False or one of {COMPILE_MODES}")
    return compiled


class Fallback:
    """Shared by the lazily compiled parts of one program: once Inductor fails here, all of them run eager, and the
    user is told once."""

    def __init__(self):
        self.reason: str | None = None

    def fail(self, exc: BaseException) -> None:
        if self.reason is None:
            self.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            warnings.warn(f"qvla: Inductor could not compile this program on this machine ({self.reason}); running "
                          "the eager program instead (same results, slower). Set QVLA_COMPILE=0 or call "
                          "module(compiled=False) to skip compiling.", RuntimeWarning, stacklevel=2)


class LazyCompiled(torch.nn.Module):
    """`module` compiled with `compile_program` at its first call (so building it costs nothing). If compiling or
    running the compiled program fails where the eager one runs, it warns once (through `fallback`) and stays eager;
    an error the eager program raises too is the caller's, and is raised as is."""

    def __init__(self, module: torch.nn.Module, fallback: Fallback | None = None, **compile_options):
        super().__init__()
        self.eager, self.fallback, self._options = module, fallback or Fallback(), compile_options
        self.compiled: CompiledProgram | None = None

    def forward(self, *args, **kwargs):
        if self.fallback.reason is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.run_compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Inductor fails in many ways (no C++ compiler, unsupported op)
            with torch.no_grad():
                out = self.eager(*args, **kwargs)  # raises here if the inputs are what is wrong
            self.fallback.fail(exc)
            return out

    def run_compiled(self, *args, **kwargs):
        """The compiled program's call, compiling first if needed (a subclass compiles otherwise: native_cache)."""
        if self.compiled is None:
            self.compiled = compile_program(self.eager, **self._options)
        return self.compiled(*args, **kwargs)


def aot_package(programs: torch.export.ExportedProgram | dict[str, torch.export.ExportedProgram], path: str, *,
                runtime_constant_folding: bool = True, extra_files: dict[str, str] | None = None,
                inputs: dict[str, tuple] | None = None) -> str:
    """Compile exported qvla programs ahead of time with AOTInductor into one `.pt2` package (C++ kernels + weights;
    load it with `torch._inductor.aoti_load_package(path, model_name=...)` or torch's `load_pt2`, no Python graph at
    run time). One program is stored as "model"; a dict, e.g. a policy's {"prefix", "denoise"}, under its names.
    The qvla:: ops are decomposed as in `compile_program`. `runtime_constant_folding` keeps the integer weights in
    the package and folds their fp32 GEMM operands once, when the package first runs, instead of storing fp32 copies.
    `extra_files` (name -> text) are stored beside the programs, as `QuantizedProgram.save` stores qvla/*.json.
    `inputs` (name -> (args, kwargs)) compiles a program for those inputs' shapes instead of its example inputs'."""
    from torch.export.pt2_archive._package import package_pt2

    from qvla_compiler.lowering.inductor_forms import for_inductor

    register()
    options = {"aot_inductor.use_runtime_constant_folding": runtime_constant_folding, "aot_inductor.package": True}
    if isinstance(programs, torch.export.ExportedProgram):
        programs = {"model": programs}
    files = {}
    for name, ep in programs.items():
        args, kwargs = (inputs or {}).get(name, ep.example_inputs)
        gm = for_inductor(ep.module(check_guards=False))  # as in compile_program
        files[name] = torch._inductor.aot_compile(gm, args, kwargs, options=dict(options))
    return package_pt2(path, aoti_files=files, extra_files=extra_files or {})
