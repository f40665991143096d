"""`module(compiled="aot")`: AOTInductor at the first call, cached on disk, loaded by later programs; a private
cache directory only; the key changes with anything the native code depends on."""
import os
import warnings

import pytest
import torch

import qvla_compiler
from policy_fixtures import policy_args, quantized_policy
from qvla_compiler.errors import UsageError
from qvla_compiler.kernels import inductor, native_cache
from qvla_compiler.kernels.native_cache import NativeCached, UnsafeCacheWarning, private_dir, program_digest


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(48, 96), torch.nn.Linear(96, 40)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 48)
    qp = qvla_compiler.quantize(TwoLinears().eval(), (x,), [(torch.randn(4, 7, 48),) for _ in range(2)], "w8a8",
                                layout="all", progress=False)
    return qp.save(tmp_path_factory.mktemp("native") / "two.pt2"), x


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "aoti"
    monkeypatch.setenv("QVLA_CACHE_DIR", str(where))
    return where


def test_compile_mode_reads_the_argument_then_the_environment(monkeypatch):
    assert [inductor.compile_mode(c) for c in (True, False, "aot", "jit", "eager")] == \
        ["jit", "eager", "aot", "jit", "eager"]
    for env, mode in (("0", "eager"), ("off", "eager"), ("aot", "aot"), ("AOT", "aot"), ("1", "jit")):
        monkeypatch.setenv("QVLA_COMPILE", env)
        assert inductor.compile_mode(None) == mode
    monkeypatch.delenv("QVLA_COMPILE")
    assert inductor.compile_mode(None) == "jit"
    with pytest.raises(UsageError, match="compiled='native'"):
        inductor.compile_mode("native")


def test_only_a_private_directory_is_a_cache(tmp_path):
    assert private_dir(tmp_path / "new" / "aoti") == tmp_path / "new" / "aoti"  # created, 0700
    assert (tmp_path / "new" / "aoti").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert private_dir(shared) is None
    (tmp_path / "file").write_text("")
    assert private_dir(tmp_path / "file") is None


def test_the_key_follows_every_weight_byte(saved):
    ep = qvla_compiler.load(saved[0]).exported_program
    digest = program_digest(ep)
    assert program_digest(qvla_compiler.load(saved[0]).exported_program) == digest
    name, tensor = next((n, t) for n, t in {**ep.state_dict, **ep.constants}.items() if t.dtype == torch.int8)
    tensor.view(-1)[0] += 1
    assert program_digest(ep) != digest, name


def test_first_call_compiles_and_caches_later_programs_load(saved, cache, monkeypatch):
    path, x = saved
    with torch.no_grad():
        eager = qvla_compiler.load(path).module(compiled=False)(x)
    first = qvla_compiler.load(path).module(compiled="aot")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the native program ran
        got = first(x)
    assert torch.allclose(got, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert [p.suffix for p in cache.iterdir()] == [".pt2"]  # one package, no temporary left

    def no_compile(*args, **kwargs):
        raise AssertionError("a cached program was compiled again")
    monkeypatch.setattr(native_cache, "aot_package", no_compile)
    again = qvla_compiler.load(path).module(compiled="aot")
    assert torch.equal(again(x), got) and again.program.fallback.reason is None
    monkeypatch.setenv("QVLA_COMPILE", "aot")  # the environment picks the same path
    assert isinstance(qvla_compiler.load(path).module().program, NativeCached)


def test_a_shared_cache_directory_is_not_used(saved, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "planted.pt2").write_text("not a package")
    monkeypatch.setenv("QVLA_CACHE_DIR", str(shared))
    built, loaded = [], []
    monkeypatch.setattr(native_cache, "aot_package", lambda programs, path, **kw: built.append(path))

    def load_pt2(path):
        loaded.append(path)
        raise RuntimeError("mocked: no package")
    monkeypatch.setattr("torch.export.pt2_archive._package.load_pt2", load_pt2)
    m = qvla_compiler.load(saved[0]).module(compiled="aot")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(saved[1])  # the mocked build writes nothing, so the native run fails and the program runs eager
    kinds = {type(w.message) for w in caught}
    assert UnsafeCacheWarning in kinds and RuntimeWarning in kinds, kinds
    assert torch.equal(out, qvla_compiler.load(saved[0]).module(compiled=False)(saved[1]))
    assert built and loaded and not any(p.startswith(str(shared)) for p in built + loaded)
    assert os.listdir(shared) == ["planted.pt2"]


@pytest.mark.slow_compile
def test_a_policy_runs_from_the_cache_as_eager(cache, tmp_path):
    policy, qp = quantized_policy("pi05-tiny", "w8a8")
    path = qp.save(tmp_path / "pi05-tiny-w8a8.pt2")
    args = policy_args(policy)
    with torch.no_grad():
        want = qvla_compiler.load(path).module(compiled=False)(*args)
        got = qvla_compiler.load(path).module(compiled="aot")(*args)
        cached = qvla_compiler.load(path).module(compiled="aot")(*args)
    assert len(list(cache.iterdir())) == 2  # prefix and denoise step
    assert torch.equal(got, cached)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_inputs_the_program_does_not_take_are_refused_before_compiling(saved, cache, monkeypatch):
    monkeypatch.setattr(native_cache, "aot_package", lambda *a, **k: pytest.fail("compiled for a refused input"))
    m = qvla_compiler.load(saved[0]).module(compiled="aot")
    with pytest.raises(qvla_compiler.errors.ShapeError):
        m(torch.randn(4, 7, 47))
    assert m.program.fallback.reason is None and not list(cache.iterdir())
