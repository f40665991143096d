"""`module(compiled="aot")`: each graph compiled ahead of time with AOTInductor at its first call, into a cache of
native packages that later processes load instead of compiling again.

The Inductor JIT of `compile_program` compiles again in every process (freezing bypasses Inductor's own FX cache:
about 30 s for a small preset, RESULTS §1n) and runs its kernels from Python. Here the first call of a graph at an
input signature builds the same decomposed program as an AOTInductor package (`inductor.aot_package`, the `qvla
quantize --aot` path) and stores it as `<cache>/<key>.pt2`; a later process with the same program, inputs, torch,
qvla_compiler and CPU loads that file in seconds. The key covers everything the native code depends on: the
program's graph and every tensor's bytes, the input shapes and dtypes, the versions, the rewrite code that prepares
the graph, and the CPU's instruction sets.

The cache holds native code that this process loads and runs, so it is read only from a directory the user owns
and nobody else can write (`QVLA_CACHE_DIR`, else `$XDG_CACHE_HOME/qvla/aoti`, else `~/.cache/qvla/aoti`); any other
directory is not used, with a warning, and the package is compiled into a private temporary one instead.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import stat
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from qvla_compiler.kernels.inductor import Fallback, LazyCompiled, aot_package

_KEY_VERSION = 1  # bump when the key's recipe changes


class UnsafeCacheWarning(UserWarning):
    """The native cache directory is not private to this user: nothing is read from or written to it."""


def cache_dir() -> Path:
    """Where the native packages live: QVLA_CACHE_DIR, else $XDG_CACHE_HOME/qvla/aoti, else ~/.cache/qvla/aoti."""
    if os.environ.get("QVLA_CACHE_DIR"):
        return Path(os.environ["QVLA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qvla" / "aoti"


def private_dir(path: Path) -> Path | None:
    """`path`, created 0700 if missing, when it is a directory owned by this user that no one else can write; else
    None (the caller compiles into a temporary directory instead)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return None
    if not hasattr(os, "getuid"):  # Windows: no POSIX owner and mode bits to check, so no cache
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return path


@functools.lru_cache(maxsize=1)
def environment_digest() -> str:
    """What the native code depends on besides the program: versions, the qvla rewrite and decomposition sources
    (a change there changes the compiled code), the CPU's instruction sets and the GEMM backend."""
    import qvla_compiler
    from qvla_compiler.kernels import cpu_gemm

    h = hashlib.sha256(f"{_KEY_VERSION} {torch.__version__} {qvla_compiler.__version__} {platform.machine()} "
                       f"{torch.backends.cpu.get_cpu_capability()} {cpu_gemm.backend()}".encode())
    root = Path(qvla_compiler.__file__).parent
    for source in sorted([*root.glob("kernels/*.py"), *root.glob("lowering/*.py")]):
        h.update(source.name.encode() + source.read_bytes())
    h.update(_cpu_flags().encode())
    return h.hexdigest()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def program_digest(ep: torch.export.ExportedProgram) -> str:
    """The program's graph, signature and every tensor it holds, byte for byte."""
    h = hashlib.sha256(ep.graph_module.code.encode() + str(ep.graph_signature).encode())
    for name, value in sorted({**ep.state_dict, **ep.constants}.items()):
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous()
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied
    return h.hexdigest()


def input_signature(args, kwargs) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return str(spec), tuple((str(x.dtype), tuple(x.shape)) if isinstance(x, torch.Tensor) else repr(x)
                            for x in leaves)


class ContiguousInputs(torch.nn.Module):
    """An AOTInductor runner fed contiguous tensors. Its kernels index each input with the strides of the example it
    was compiled on (contiguous), without checking: a view such as a chunk or a transpose (a policy's prefix output,
    a user's input) would be read wrong, silently."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, *args, **kwargs):
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))
        return self.runner(*args, **kwargs)


class NativeCached(LazyCompiled):
    """An exported program run as an AOTInductor package per input signature, compiled at the first call with that
    signature or loaded from the cache. As with `LazyCompiled`, a failure to compile or run the native code where the
    eager program runs warns once (through `fallback`) and runs eager from then on."""

    def __init__(self, ep: torch.export.ExportedProgram, fallback: Fallback | None = None):
        super().__init__(ep.module(), fallback)
        self._ep, self._digest, self._runners = ep, None, {}

    def run_compiled(self, *args, **kwargs):
        signature = input_signature(args, kwargs)
        if signature not in self._runners:
            self._runners[signature] = self._load_or_build(signature, args, kwargs)
        return self._runners[signature](*args, **kwargs)

    def _load_or_build(self, signature: tuple, args, kwargs):
        self._digest = self._digest or program_digest(self._ep)
        key = hashlib.sha256(f"{self._digest} {environment_digest()} {signature}".encode()).hexdigest()[:40]
        where = private_dir(cache_dir())
        if where is None:
            warnings.warn(f"qvla: the native cache {cache_dir()} is not a directory private to this user (owned by "
                          "you, not writable by others); compiling into a temporary directory, nothing cached. Set "
                          "QVLA_CACHE_DIR to a private directory.", UnsafeCacheWarning, stacklevel=3)
            with tempfile.TemporaryDirectory(prefix="qvla-aoti-") as private:  # loading copies what it runs
                return self._build_and_load(Path(private) / f"{key}.pt2", args, kwargs)
        return self._build_and_load(where / f"{key}.pt2", args, kwargs)

    def _build_and_load(self, path: Path, args, kwargs):
        from torch.export.pt2_archive._package import load_pt2

        if not path.is_file():
            with torch.no_grad():  # the program's guards refuse inputs it does not take before minutes of compiling
                self.eager(*args, **kwargs)  # (the compile would trace the unguarded graph at any shape)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.pt2")  # written whole, then renamed: a process
            os.close(fd)  # loading concurrently never sees half a package
            try:
                aot_package({"model": self._ep}, tmp, inputs={"model": (args, kwargs)})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ContiguousInputs(load_pt2(str(path)).aoti_runners["model"])
