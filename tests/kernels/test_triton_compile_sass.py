"""Compile-only GPU checks without a GPU: build each kernel for sm_80 and sm_90 with Triton's bundled ptxas and look
for integer MMA instructions in the SASS (IMMA = mma.sync, IGMMA = Hopper wgmma), for cp.async operand loads (LDGSTS)
and for the absence of byte-wise weight loads (LDG.E.U8), under the alignment hints real launches get.

The compile runs in a subprocess because it needs Triton's real JIT (TRITON_INTERPRET must be unset there, while the
interpreter tests in this folder set it in this process). One subprocess compiles every variant; tests read its JSON.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

_REPO = Path(__file__).resolve().parents[2]

# (name, module, kernel, pointer dtypes, constexprs, num_warps, archs)
_GEMM_META = {"GROUP_M": 8, "SPLIT_K": 1, "HAS_BIAS": True, "RAW_ACC": False, "EVEN_GROUPS": True,
              "stride_xk": 1, "stride_wk": 1, "stride_on": 1}
_VARIANTS = [
    ("int8_small", "triton_int8_linear", "_int8_linear_kernel", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, 4),
    ("int8_large", "triton_int8_linear", "_int8_linear_kernel", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, 4),
    ("int8_split_k", "triton_int8_linear", "_int8_linear_kernel",
     {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4}, 4),
    ("w4a8_small", "triton_int4_linear", "_int4_linear_kernel",
     {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "X_PACKED": False}, 4),
    ("w4a8_large", "triton_int4_linear", "_int4_linear_kernel",
     {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "X_PACKED": False}, 4),
    ("w4a4_packed_large", "triton_int4_linear", "_int4_linear_kernel",
     {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "X_PACKED": True}, 8),
]
_ARCHS = (80, 90)

_SCRIPT = textwrap.dedent("""
    import importlib, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.disasm import get_sass

    variants, archs, gemm_meta = json.loads(sys.argv[1])
    ptr = {"x_ptr": "*i8", "w_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*bf16", "static_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*fp32"}

    def build(fn, consts, warps, arch):
        sig = {a: ("constexpr" if a in consts else ptr.get(a, "i32")) for a in fn.arg_names}
        # what the JIT infers for real launches: 16-byte aligned pointers, sizes/strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and a not in ("M", "N", "num_groups", "stride_xs", "stride_wsg", "stride_static")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})
        sass = get_sass(k.asm["cubin"])
        count = lambda pattern: len(re.findall(pattern, sass))
        return {"IMMA": count(r"\\bIMMA\\b"), "IGMMA": count(r"\\bIGMMA\\b"), "LDGSTS": count(r"\\bLDGSTS"),
                "LDG_U8": count(r"\\bLDG\\.E\\.U8"), "shared": k.metadata.shared}

    out = {}
    for name, module, kernel, consts, warps in variants:
        fn = getattr(importlib.import_module("qvla_compiler.kernels." + module), kernel)
        meta = {k: v for k, v in gemm_meta.items() if k in fn.arg_names}
        for arch in archs:
            out[f"{name}@sm_{arch}"] = build(fn, {**meta, **consts}, warps, arch)
    quant = importlib.import_module("qvla_compiler.kernels.triton_quantize_act")._quantize_act_kernel
    consts = {"QMAX": 127.0, "HAS_STATIC": False, "PACK_INT4": False, "SINGLE_PASS": True, "BLOCK_K": 2048}
    out["quantize_act@sm_90"] = build(quant, consts, 4, 90)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sass_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    arg = json.dumps([_VARIANTS, _ARCHS, _GEMM_META])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, arg], env=env, cwd=_REPO, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        if any(s in tail for s in ("ptxas", "cuobjdump", "nvdisasm", "No such file", "PTXAS")):
            pytest.skip(f"CUDA toolchain bundled with triton is not usable here: {tail}")
        pytest.fail(f"compiling the kernels for sm_80/sm_90 failed:\n{tail}")
    return json.loads(lines[0][len("RESULT"):])


@pytest.mark.parametrize("arch", _ARCHS)
@pytest.mark.parametrize("name", [v[0] for v in _VARIANTS])
def test_gemm_uses_integer_mma(sass_counts, name, arch):
    counts = sass_counts[f"{name}@sm_{arch}"]
    block_m = next(v for v in _VARIANTS if v[0] == name)[3]["BLOCK_M"]
    assert counts["shared"] <= 227 * 1024, counts  # fits Hopper's (and A100's 163 KB: checked below) shared memory
    if arch == 80:
        assert counts["shared"] <= 163 * 1024, counts
    if arch == 90 and block_m >= 64:  # wgmma needs a 64-row multiple and num_warps % 4 == 0
        assert counts["IGMMA"] > 0, counts
    else:
        assert counts["IMMA"] > 0 and counts["IGMMA"] == 0, counts
    # operand tiles go through cp.async (pipelined) and int4 weights are never read byte by byte
    assert counts["LDGSTS"] > 0 and counts["LDG_U8"] == 0, counts


def test_quantize_act_compiles_without_mma(sass_counts):
    assert sass_counts["quantize_act@sm_90"]["IMMA"] == 0
