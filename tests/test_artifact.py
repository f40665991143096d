"""qvla_compiler/artifact.py: loading is data-only, saves are byte-reproducible and atomic, no temp file survives.

Every crafted archive carries a live payload: `trust=True` (plain torch.export.load) runs it and creates the marker
file, the default load never does and raises ArtifactError instead.
"""
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qvla_compiler
from qvla_compiler import artifact
from qvla_compiler.cli import main as cli_main
from qvla_compiler.errors import ArtifactError
from qvla_compiler.inspect.summary import inspect_data

ROOT = "archive/"


def _tiny_program(seed=0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    return qvla_compiler.quantize(module, (x,), [(x,)], recipe="w8a8", progress=False), x


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    qp, x = _tiny_program()
    path = qp.save(tmp_path_factory.mktemp("base") / "base.pt2")
    return path, qp, x


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _write(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class _Payload:
    """Unpickling this creates `marker` (builtins.open), standing in for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _torch_pickle(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_json(members, name, edit):
    doc = json.loads(members[ROOT + name])
    edit(doc)
    members[ROOT + name] = json.dumps(doc).encode()


def _in_sample_inputs(m, marker):
    m[ROOT + "data/sample_inputs/model.pt"] = _torch_pickle(((torch.zeros(4, 16),), {"x": _Payload(marker)}))


def _in_weight(m, marker):  # a weight flagged use_pickle whose file is a torch.save'd object
    m[ROOT + "data/weights/weight_0"] = _torch_pickle(_Payload(marker))
    _edit_json(m, "data/weights/model_weights_config.json",
               lambda d: d["config"]["0.weight"].update(use_pickle=True))


def _in_constant(m, marker):
    m[ROOT + "data/constants/tensor_0"] = _torch_pickle(_Payload(marker))
    entry = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    _edit_json(m, "data/constants/model_constants_config.json", lambda d: d["config"].update(c=entry))


def _in_opaque_constant(m, marker):  # torch plain pickle.loads opaque_obj_* members
    m[ROOT + "data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
    entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    _edit_json(m, "data/constants/model_constants_config.json", lambda d: d["config"].update(c=entry))


def _in_legacy_weights(m, marker):  # the pre-2.8 member torch still reads with a weights_only=False fallback
    m[ROOT + "data/weights/model.pt"] = _torch_pickle({"w": _Payload(marker)})


def _in_shape_expression(m, marker):  # torch sympify()s (evals) expr_str
    def edit(doc):
        meta = doc["graph_module"]["graph"]["tensor_values"]["input"]
        meta["sizes"][0] = {"as_expr": {"expr_str": f"open({str(marker)!r}, 'w')", "hint": {"as_int": 4}}}
    _edit_json(m, "models/model.json", edit)


def _in_extra_file(m, marker):
    m[ROOT + "extra/payload.pkl"] = pickle.dumps(_Payload(marker))


def _as_report(m, marker):
    m[ROOT + "extra/qvla/report.json"] = pickle.dumps(_Payload(marker))


# payload -> does plain torch.export.load (trust=True) run it? (extra files are only ever read as text)
PAYLOADS = {"sample_inputs": (_in_sample_inputs, True), "weight": (_in_weight, True),
            "constant": (_in_constant, True), "opaque_constant": (_in_opaque_constant, True),
            "legacy_weights": (_in_legacy_weights, True), "shape_expression": (_in_shape_expression, True),
            "extra_file": (_in_extra_file, False), "report": (_as_report, False)}


@pytest.mark.parametrize("where", PAYLOADS)
def test_pickle_payloads_never_run(base, tmp_path, where):
    craft, torch_runs_it = PAYLOADS[where]
    marker = tmp_path / "PWNED"
    members = _members(base[0])
    craft(members, marker)
    path = _write(tmp_path / "evil.pt2", members)
    with pytest.raises(ArtifactError) as err:
        qvla_compiler.load(path)
    assert not marker.exists()
    assert "trust=True" in str(err.value) or "re-create" in str(err.value).lower()
    assert cli_main(["inspect", str(path)]) == 2
    assert not marker.exists()
    if torch_runs_it:  # the control: the payload is live, torch.export.load does run it
        try:
            qvla_compiler.load(path, trust=True)
        except Exception:  # noqa: BLE001 - some payloads break the load after running, others do not
            pass
        assert marker.exists()


def test_refusals_name_the_member(base, tmp_path):
    members = _members(base[0])
    _in_weight(members, tmp_path / "m")
    with pytest.raises(ArtifactError, match=r"'0\.weight'.*use_pickle"):
        qvla_compiler.load(_write(tmp_path / "w.pt2", members))
    members = _members(base[0])
    _in_sample_inputs(members, tmp_path / "m")
    with pytest.raises(ArtifactError, match="data/sample_inputs/model.pt.*weights_only"):
        qvla_compiler.load(_write(tmp_path / "s.pt2", members))
    members = _members(base[0])
    members[ROOT + "data/aotinductor/model/model.so"] = b"\x7fELF"
    with pytest.raises(ArtifactError, match="data/aotinductor/model/model.so"):
        qvla_compiler.load(_write(tmp_path / "so.pt2", members))


def test_graph_calling_a_python_function_is_refused(base, tmp_path):
    members = _members(base[0])

    def edit(doc):
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.relu.default")
        node["target"] = "torch.os.system"  # resolvable by getattr from torch; would run on the first forward
    _edit_json(members, "models/model.json", edit)
    path = _write(tmp_path / "call.pt2", members)
    with pytest.raises(ArtifactError, match="function system.* is not an allowed operator"):  # torch's verifier
        qvla_compiler.load(path)


def test_valid_program_round_trips_data_only(base):
    path, qp, x = base
    loaded = qvla_compiler.load(path)
    assert torch.equal(loaded.module()(x), qp.module()(x))
    assert loaded.meta["kind"] == "module" and loaded.plan == qp.plan
    assert loaded.report.to_json() == qp.report.to_json()
    args, kwargs = loaded.exported_program.example_inputs
    assert torch.equal(args[0], x) and kwargs == {}
    assert torch.equal(qvla_compiler.load(path, trust=True).module()(x), qp.module()(x))
    assert torch.equal(torch.export.load(path).module()(x), qp.module()(x))  # a module's program: plain torch reads it


def test_dynamic_shapes_round_trip_data_only(tmp_path):
    """A symbolic batch puts srepr'd shape expressions in the graph JSON; they pass the check and still work."""
    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    x = torch.randn(3, 8)
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    path = artifact.write_archive(ep, tmp_path / "dyn.pt2", {})
    assert b"Symbol(" in _members(path)[ROOT + "models/model.json"]
    programs, extras = artifact.read_archive(path, ["qvla/meta.json"])
    assert extras == {} and list(programs) == ["model"]
    x5 = torch.randn(5, 8)
    assert torch.equal(programs["model"].module()(x5), module(x5))


@pytest.mark.parametrize("expr,ok", [
    ("Symbol('s0', integer=True, positive=True)", True),
    ("Mul(Integer(2), Add(Symbol('s0', positive=True), Integer(-1)))", True),
    ("FloorDiv(Symbol('s1', integer=True), Integer(2))", True),
    ("StrictLessThan(Symbol('u0', integer=True), Float('1.5', precision=53))", True),
    ("__import__('os').system('true')", False),
    ("Symbol('s0').func", False),
    ("Symbol('s0', prime=True).__class__", False),
    ("open('x', 'w')", False),
    ("prime(10)", False),  # a keyword name is admitted only as `name=`
])
def test_shape_expression_check(expr, ok):
    assert artifact._is_arithmetic(expr) is ok


def test_corrupt_archive_is_one_clean_error(base, tmp_path, capfd):
    data = base[0].read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    for trust in (False, True):
        with pytest.raises(ArtifactError, match="not a readable .pt2 program"):
            qvla_compiler.load(tmp_path / "cut.pt2", trust=trust)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _drop(data: bytes, index: int) -> bytes:
    members = _members(io.BytesIO(data))
    del members[list(members)[index % len(members)]]
    return _write(io.BytesIO(), members).getvalue()


_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 100), st.just(0)))


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_mutated_archives_raise_only_artifact_error(base, tmp_path, mutations):
    data = bytearray(base[0].read_bytes())
    for kind, at, xor in mutations:
        if kind == "flip" and data:
            data[at % len(data)] ^= xor
        elif kind == "truncate":
            data = data[: at % (len(data) + 1)]
        elif kind == "drop":
            try:
                data = bytearray(_drop(bytes(data), at))
            except Exception:  # noqa: BLE001 - already unreadable as a zip: keep the bytes as they are
                pass
    path = tmp_path / "mutant.pt2"
    path.write_bytes(bytes(data))
    try:
        qvla_compiler.load(path)
    except ArtifactError:
        pass


def test_saves_are_byte_reproducible(base, tmp_path):
    path, qp, _ = base
    again = qp.save(tmp_path / "again.pt2")
    qp2, _ = _tiny_program()  # a second, independent quantize of the same module
    other = qp2.save(tmp_path / "sub" / "other-name.pt2")
    assert _sha(path) == _sha(again) == _sha(other)
    assert all(n.startswith(ROOT) for n in _members(path))  # not a random temp-file folder name


def test_a_save_staged_on_disk_writes_the_same_bytes_and_leaves_nothing_behind(base, tmp_path, monkeypatch):
    path, qp, _ = base
    staged = []

    class Recorded(tempfile.SpooledTemporaryFile):
        def __exit__(self, *exc):
            staged.append(self._rolled)  # True: it went to a real (unnamed) file
            return super().__exit__(*exc)

    monkeypatch.setattr(artifact, "_SPOOL_BYTES", 1)  # every archive spills, as full-size programs do
    monkeypatch.setattr(artifact.tempfile, "SpooledTemporaryFile", Recorded)
    spilled = qp.save(tmp_path / "spilled.pt2")
    assert staged == [True] and _sha(spilled) == _sha(path)
    assert [p.name for p in tmp_path.iterdir()] == ["spilled.pt2"]  # the staging file was unnamed and is gone


def test_stale_temp_of_a_dead_save_is_removed(base, tmp_path):
    _, qp, _ = base
    target = tmp_path / "prog.pt2"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"prog.pt2.{dead.pid}.0badc0de.tmp.pt2"
    stale.write_bytes(b"x" * 1000)
    running = tmp_path / f"prog.pt2.{os.getppid()}.0badc0de.tmp.pt2"  # a live process: maybe saving right now
    running.write_bytes(b"y")
    unrelated = tmp_path / "other.pt2.1.0badc0de.tmp.pt2"
    unrelated.write_bytes(b"z")
    qp.save(target)
    assert not stale.exists() and running.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, unrelated.name])


def test_interrupted_save_leaves_no_temp_and_keeps_the_old_program(base, tmp_path, monkeypatch):
    path, qp, _ = base
    target = tmp_path / "prog.pt2"
    target.write_bytes(b"previous program")
    seen = []

    def interrupt(fd):
        seen.extend(p.name for p in tmp_path.glob("*.tmp.pt2"))
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        qp.save(target)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].startswith("prog.pt2.")  # the temp file existed while writing...
    assert list(tmp_path.glob("*.tmp.pt2")) == []  # ...and is gone
    assert target.read_bytes() == b"previous program"
    qp.save(target)
    assert _sha(target) == _sha(path)


# ---------------------------------------------------------------------------------------------- policy programs
# A policy is stored as two programs, "prefix" and "denoise" (one Euler step), exported from the lowered graphs; the
# loaded module runs the Euler loop in Python over the schedule in qvla/meta.json.

@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    from policy_fixtures import quantized_policy

    out = tmp_path_factory.mktemp("policies")
    return {name: (*quantized_policy(name, recipe), quantized_policy(name, recipe)[1].save(out / f"{name}.pt2"))
            for name, recipe in (("pi05-tiny", "w8a8"), ("groot-tiny", "w4a8"))}


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_policy_round_trips_bitwise_at_any_batch(policies, name):
    from policy_fixtures import policy_args

    policy, qp, path = policies[name]
    names = set(_members(path))
    assert {ROOT + "models/prefix.json", ROOT + "models/denoise.json"} <= names
    assert ROOT + "models/model.json" not in names
    loaded = qvla_compiler.load(path)
    assert loaded.meta["format"] == 2 and loaded.schedule == policy.schedule
    assert list(loaded.exported_programs) == ["prefix", "denoise"]
    module = loaded.module()
    for batch in (1, 3):
        args = policy_args(policy, batch=batch)
        assert torch.equal(module(*args), qp.module()(*args))
    # the denoise graph holds one step: each denoise linear is called once, not once per Euler step
    calls = [str(n.target) for n in loaded.exported_programs["denoise"].graph.nodes if n.op == "call_function"]
    linears = sum(r.graph == "denoise" for r in qp.report.linears)
    assert sum(c in ("aten.linear.default", "qvla.int8_linear.default", "qvla.int4_linear.default")
               for c in calls) <= linears
    with pytest.raises(ArtifactError, match="exported_programs"):
        loaded.exported_program
    if name == "pi05-tiny":  # trust=True (torch's own loader) reads the same programs
        args = policy_args(policy, batch=2)
        assert torch.equal(qvla_compiler.load(path, trust=True).module()(*args), qp.module()(*args))


def test_policy_saves_are_byte_reproducible(policies, tmp_path):
    _, qp, path = policies["pi05-tiny"]
    assert _sha(qp.save(tmp_path / "again.pt2")) == _sha(path)


def test_format_1_policy_still_loads(policies, tmp_path):
    """Format 1 stored one program with the Euler loop unrolled in it (here a 1-step schedule, cheap to export)."""
    from policy_fixtures import policy_args

    from qvla_compiler.models.sampling import FlowSchedule
    from qvla_compiler.program import PolicyProgram

    policy, qp, path = policies["pi05-tiny"]
    one_step = PolicyProgram(qp.program.graphs["prefix"], qp.program.graphs["denoise"], FlowSchedule((1.0,), -1.0))
    args = policy_args(policy, batch=2)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = torch.export.export(one_step, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False)
    meta = json.loads(_members(path)[ROOT + "extra/qvla/meta.json"])
    meta.update(format=1)
    del meta["schedule"]
    extra = {name: _members(path)[ROOT + "extra/" + name].decode() for name in ("qvla/report.json", "qvla/plan.json")}
    old = artifact.write_archive(ep, tmp_path / "v1.pt2", {**extra, "qvla/meta.json": json.dumps(meta)})
    loaded = qvla_compiler.load(old)
    assert loaded.schedule is None and list(loaded.exported_programs) == ["model"]
    args3 = policy_args(policy, batch=3)
    assert torch.equal(loaded.module()(*args3), one_step(*args3))
    assert len(inspect_data(old)["linears"]) == len(qp.report.linears)


def _policy_members(policies):
    return _members(policies["pi05-tiny"][2])


def test_policy_payloads_never_run(policies, tmp_path):
    """The data-only checks hold for every program in the archive, not only the first."""
    marker = tmp_path / "PWNED"
    cases = {}
    m = _policy_members(policies)
    m[ROOT + "data/sample_inputs/denoise.pt"] = _torch_pickle(((), {"x": _Payload(marker)}))
    cases["denoise sample inputs"] = (m, "data/sample_inputs/denoise.pt.*weights_only")
    m = _policy_members(policies)
    config = json.loads(m[ROOT + "data/weights/denoise_weights_config.json"])
    fqn, entry = next(iter(config["config"].items()))
    m[ROOT + "data/weights/" + entry["path_name"]] = _torch_pickle(_Payload(marker))
    _edit_json(m, "data/weights/denoise_weights_config.json", lambda d: d["config"][fqn].update(use_pickle=True))
    cases["denoise weight"] = (m, "use_pickle")
    m = _policy_members(policies)
    _edit_json(m, "models/denoise.json", lambda d: d["graph_module"]["graph"]["tensor_values"].update(
        x={"sizes": [{"as_expr": {"expr_str": f"open({str(marker)!r}, 'w')", "hint": {"as_int": 4}}}]}))
    cases["denoise shape expression"] = (m, "not plain arithmetic")
    m = _policy_members(policies)
    m[ROOT + "models/a.b.json"] = m[ROOT + "models/prefix.json"]
    cases["odd model name"] = (m, "models/a.b.json")
    for i, (what, (members, match)) in enumerate(cases.items()):
        with pytest.raises(ArtifactError, match=match):
            qvla_compiler.load(_write(tmp_path / f"evil{i}.pt2", members))
        assert not marker.exists(), what


def test_policy_with_missing_or_extra_graphs_is_refused(policies, tmp_path):
    """An archive whose programs are not the ones its format and kind name (prefix + denoise; model) is refused."""
    members = _policy_members(policies)
    for name in ("models/prefix.json", "data/weights/prefix_weights_config.json",
                 "data/constants/prefix_constants_config.json", "data/sample_inputs/prefix.pt"):
        members[ROOT + name.replace("prefix", "extra")] = members[ROOT + name]
    with pytest.raises(ArtifactError, match=r"holds the graphs \['denoise', 'extra', 'prefix'\]"):
        qvla_compiler.load(_write(tmp_path / "extra.pt2", members))
    members = {k: v for k, v in _policy_members(policies).items() if "/prefix" not in k}
    _edit_json(members, "extra/qvla/meta.json", lambda d: d.update(format=1))  # a v1 file holds one "model"
    with pytest.raises(ArtifactError, match=r"holds the graphs \['denoise'\], but a format-1 policy program has "
                                            r"\['model'\]"):
        qvla_compiler.load(_write(tmp_path / "missing.pt2", members))


class CacheWriter(nn.Module):
    """Writes a cache buffer in place in forward (a KV-cache style policy) and reads it back."""

    def __init__(self):
        super().__init__()
        self.k, self.mlp = nn.Linear(16, 16), nn.Linear(16, 16)
        self.register_buffer("cache", torch.zeros(4, 3, 16))

    def forward(self, x):
        self.cache[: x.shape[0]].copy_(self.k(x))
        return self.mlp(x) + self.cache[: x.shape[0]].mean(1, keepdim=True)


def test_a_program_writing_a_buffer_runs_after_save_and_load_outside_no_grad(tmp_path):
    """Run outside no_grad, the program's cache requires grad when saved; loaded as a leaf that did, the next
    in-place write into it failed ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). Buffers load without requires_grad."""
    torch.manual_seed(0)
    module, x = CacheWriter().eval(), torch.randn(2, 3, 16)
    qp = qvla_compiler.quantize(module, (x,), [(torch.randn(2, 3, 16),)], "w8a8", layout="all", progress=False)
    program = qp.module(compiled=False)
    want = program(x)  # outside no_grad, as a user may call it
    loaded = qvla_compiler.load(qp.save(tmp_path / "cache.pt2")).module(compiled=False)
    assert not any(b.requires_grad for b in loaded.buffers())
    assert torch.equal(loaded(x), want) and torch.equal(loaded(x), want)
