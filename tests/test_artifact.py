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


def test_dynamic_shapes_round_trip_data_only(tmp_path):
    """A symbolic batch puts srepr'd shape expressions in the graph JSON; they pass the check and still work."""
    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    x = torch.randn(3, 8)
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    path = artifact.write_archive(ep, tmp_path / "dyn.pt2", {})
    assert b"Symbol(" in _members(path)[ROOT + "models/model.json"]
    loaded, extras = artifact.read_archive(path, ["qvla/meta.json"])
    assert extras == {}
    x5 = torch.randn(5, 8)
    assert torch.equal(loaded.module()(x5), module(x5))


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
