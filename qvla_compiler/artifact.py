"""The `.pt2` program archive: byte-reproducible, atomic writes and data-only reads.

Layout (torch.export.save of one program named "model", every member under one root folder):
  models/model.json                  the graph, JSON       data/sample_inputs/model.pt   torch.save'd (args, kwargs)
  data/weights/model_weights_config.json, data/constants/model_constants_config.json   fqn -> file, dtype, shape
  data/weights/weight_<i>, data/constants/tensor_<i>   raw tensor bytes      extra/<name>   UTF-8 text (qvla/*.json)
  archive_format, archive_version, byteorder, .data/version, .data/serialization_id     bookkeeping

Why not torch.export.load: it unpickles with weights_only=False (sample inputs after a failed safe load, weights and
constants flagged use_pickle, custom/opaque objects, legacy members), dlopens AOTInductor members, and sympify()s
(eval) shape expressions from the JSON. read_archive reads the members itself, admits only raw tensors, JSON and a
weights_only=True pickle of the sample inputs, checks every shape expression, and hands torch's deserializer
ready-made tensors, so none of those paths can be reached. (A graph node calling a Python function instead of an
operator is refused by torch's own ExportedProgram verifier.) `trust=True` uses torch.export.load as is.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import secrets
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import torch
import torch.utils._sympy.functions as sympy_functions
from sympy.core.assumptions import _assume_defined
from torch._export.serde import schema, serialize
from torch.export.pt2_archive import PT2ArchiveWriter
from torch.export.pt2_archive import constants as pt2

from qvla_compiler.errors import ArtifactError

_MODEL = "model"
_TMP_SUFFIX = ".tmp.pt2"
_WEIGHTS = (pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(_MODEL), pt2.WEIGHT_FILENAME_PREFIX)
_CONSTANTS = (pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(_MODEL),
              pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
_GRAPH = pt2.MODELS_FILENAME_FORMAT.format(_MODEL)
_SAMPLE_INPUTS = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(_MODEL)
_BOOKKEEPING = (pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
                ".data/serialization_id")
_WRITER_OWNED = (".data/version", "byteorder", ".data/serialization_id")  # PT2ArchiveWriter writes these itself
_GRAPH_ID = re.compile(rb'(\\?"graph_id\\?":\s*)(\d+)')
_TENSOR_FILE = re.compile(r"({}|{})\d+".format(*(re.escape(d + p) for d, _, p in (_WEIGHTS, _CONSTANTS))))
# Shape expressions are sympified (= eval'd). torch writes them with srepr, e.g.
# `Mul(Integer(2), Symbol('s0', integer=True, positive=True))`: admit numbers (bare or quoted), quoted symbol names,
# operators, sympy/torch function names and assumption keywords; nothing else (no attributes, no other strings).
_NUMBER = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
_EXPR_TOKEN = re.compile(rf"\s*(?:{_NUMBER}|'(?:[a-z]+\d+|{_NUMBER})'|([A-Za-z_]\w*)(\s*=(?!=))?|\*\*|//"
                         r"|[-+*/%(),<>=!&|~^])")
_SYMBOL = re.compile(r"[a-z]+\d+")
_KEYWORDS = frozenset(_assume_defined) | {"precision"}
_SYMPY_NAMES = frozenset(sympy_functions.__all__) | {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "sqrt", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair", "true", "false", "True", "False",
    "BooleanTrue", "BooleanFalse", "oo", "zoo", "nan"}
_TORCH_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")
_HOW_TO_FIX = ("Re-create it with `qvla quantize`; load it with trust=True (`qvla inspect --trust`) only if you "
               "wrote this file yourself.")


def write_archive(ep: torch.export.ExportedProgram, path: str | os.PathLike, extra_files: dict[str, str]) -> Path:
    """Write `ep` to `path` byte-reproducibly and atomically.

    The archive is serialized in memory (so its root folder is always "archive", not a random temp name; the graph
    ids torch records as provenance, which are memory addresses, are renumbered), written
    to `<path>.<pid>.<random>.tmp.pt2` and renamed over `path`; any exception, KeyboardInterrupt included, removes
    the temp file and leaves a previous `path` untouched. Temp files of dead processes (SIGKILL) are removed first.
    """
    path = Path(path)
    data = _serialize(ep, extra_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _serialize(ep: torch.export.ExportedProgram, extra_files: dict[str, str]) -> bytes:
    """torch.export.save into memory, then re-pack with provenance graph ids (memory addresses) renumbered."""
    raw, out = io.BytesIO(), io.BytesIO()
    torch.export.save(ep, raw, extra_files=extra_files)
    with zipfile.ZipFile(raw) as archive, PT2ArchiveWriter(out) as writer:
        for info in archive.infolist():
            name = info.filename.split("/", 1)[1]
            if name not in _WRITER_OWNED:
                data = archive.read(info)
                writer.write_bytes(name, _stable_graph_ids(data) if name == _GRAPH else data)
    return out.getvalue()


def _stable_graph_ids(graph_json: bytes) -> bytes:
    # from_node metadata records id(graph) of every graph a node passed through: number them in order instead.
    ids: dict[bytes, bytes] = {}
    return _GRAPH_ID.sub(lambda m: m[1] + ids.setdefault(m[2], str(len(ids)).encode()), graph_json)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete `<path>.<pid>.*.tmp.pt2` left by saves whose process no longer runs; return what was removed."""
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 1:].split(".", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not saving it now: it is a leftover of an earlier, interrupted save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user (or unknowable): leave it alone
    return True


def read_archive(path: str | os.PathLike, extra_names: Iterable[str], *, trust: bool = False
                 ) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """Load the program and the named extra files (missing ones are absent from the dict).

    Data only unless `trust`: a member that would need unpickling arbitrary objects, an unknown member or a shape
    expression that is not arithmetic raises ArtifactError, as does any damage to the archive.
    """
    path = Path(path)
    with _quiet_torch():
        if trust:
            return _read_trusted(path, extra_names)
        try:
            return _read_data_only(path, tuple(extra_names))
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged archive can fail anywhere in torch's deserializer
            raise ArtifactError(f"{path} is not a readable .pt2 program ({type(exc).__name__}: "
                                f"{str(exc)[:300]}). Re-create it with `qvla quantize`.") from exc


def _read_trusted(path: Path, extra_names: Iterable[str]):
    extra = dict.fromkeys(extra_names, "")
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{path} is not a readable .pt2 program ({type(exc).__name__}: {str(exc)[:300]}). "
                            "Re-create it with `qvla quantize`.") from exc
    return ep, {k: v for k, v in extra.items() if v}


def _read_data_only(path: Path, extra_names: tuple[str, ...]):
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        root = _check_members(zf, path, extra_names)
        names = {info.filename[len(root):] for info in zf.infolist()}

        def read(name: str) -> bytes:
            return zf.read(root + name)

        if read(pt2.ARCHIVE_FORMAT_PATH) != pt2.ARCHIVE_FORMAT_VALUE.encode():
            raise ArtifactError(f"{path} is a zip file but not a .pt2 archive. Re-create it with `qvla quantize`.")
        if read(pt2.ARCHIVE_VERSION_PATH) != pt2.ARCHIVE_VERSION_VALUE.encode():
            raise ArtifactError(f"{path} has .pt2 archive version {read(pt2.ARCHIVE_VERSION_PATH)[:20]!r}; this "
                                f"torch reads {pt2.ARCHIVE_VERSION_VALUE!r}. Re-create it with `qvla quantize`.")
        graph = json.loads(read(_GRAPH))
        _check_expressions(graph, path)
        state_dict = _tensors(read, names, _WEIGHTS, path)
        constants = _tensors(read, names, _CONSTANTS, path)
        inputs = _sample_inputs(read(_SAMPLE_INPUTS), path) if _SAMPLE_INPUTS in names else None
        extras = {n: read(pt2.EXTRA_DIR + n).decode("utf-8") for n in extra_names if pt2.EXTRA_DIR + n in names}
    serialized = serialize._dict_to_dataclass(schema.ExportedProgram, graph)
    ep = serialize.ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, inputs)
    return ep, extras


def _check_members(zf: zipfile.ZipFile, path: Path, extra_names: tuple[str, ...]) -> str:
    """Every member sits under one root, appears once, is stored uncompressed and is one we know how to read."""
    infos = zf.infolist()
    root = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    allowed = {_GRAPH, _SAMPLE_INPUTS, _WEIGHTS[1], _CONSTANTS[1], *_BOOKKEEPING,
               *(pt2.EXTRA_DIR + n for n in extra_names)}
    seen = set()
    for info in infos:
        name = info.filename[len(root):]
        if not info.filename.startswith(root) or info.filename in seen:
            raise ArtifactError(f"{path}: member {info.filename!r} is outside the archive root {root!r} or appears "
                                f"twice, so what would be read is ambiguous. {_HOW_TO_FIX}")
        seen.add(info.filename)
        if name not in allowed and not _TENSOR_FILE.fullmatch(name):
            raise ArtifactError(f"{path}: member {name!r} is not part of a qvla_compiler program (only graph JSON, "
                                f"raw tensors, sample inputs and qvla/*.json are read); refusing it. {_HOW_TO_FIX}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArtifactError(f"{path}: member {name!r} is compressed; programs store members uncompressed. "
                                f"{_HOW_TO_FIX}")
    present = {info.filename[len(root):] for info in infos}
    for name in (pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, _GRAPH, _WEIGHTS[1], _CONSTANTS[1]):
        if name not in present:
            raise ArtifactError(f"{path} is not a complete .pt2 program: member {name!r} is missing. "
                                "Re-create it with `qvla quantize`.")
    return root


def _tensors(read, names: set[str], kind: tuple[str, str, str], path: Path) -> dict[str, torch.Tensor]:
    """Raw tensors named by a payload config; aliasing entries share one storage as torch's loader does."""
    directory, config_name, prefix = kind
    config = serialize._dict_to_dataclass(schema.PayloadConfig, json.loads(read(config_name)))
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        member = directory + meta.path_name
        if meta.use_pickle or meta.tensor_meta is None:
            raise ArtifactError(f"{path}: {fqn!r} ({member}) is stored as a pickle (use_pickle), which would run "
                                f"code on load; refusing it. {_HOW_TO_FIX}")
        if not _TENSOR_FILE.fullmatch(member) or not member.startswith(directory + prefix) or member not in names:
            raise ArtifactError(f"{path}: {fqn!r} points at {member!r}, which is not a raw tensor member of this "
                                f"archive. {_HOW_TO_FIX}")
        tm = meta.tensor_meta
        if member not in storages:
            data = bytearray(read(member))
            raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            storages[member] = raw.to(serialize.deserialize_device(tm.device))
        flat = storages[member].view(serialize.deserialize_scalar_type(tm.dtype))
        t = torch.as_strided(flat, serialize.deserialize_size(tm.sizes), serialize.deserialize_stride(tm.strides),
                             serialize.deserialize_storage_offset(tm.storage_offset))
        out[fqn] = torch.nn.Parameter(t, requires_grad=tm.requires_grad) if meta.is_param else \
            t.requires_grad_(tm.requires_grad)
    return out


def _sample_inputs(data: bytes, path: Path) -> tuple:
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, or anything a damaged stream raises
        raise ArtifactError(f"{path}: member {_SAMPLE_INPUTS!r} is not plain tensor data (weights_only load "
                            f"failed: {type(exc).__name__}); refusing to unpickle it. {_HOW_TO_FIX}") from exc
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
        raise ArtifactError(f"{path}: member {_SAMPLE_INPUTS!r} holds {type(inputs).__name__}, not (args, kwargs). "
                            f"{_HOW_TO_FIX}")
    return inputs


def _check_expressions(node, path: Path) -> None:
    """torch sympify()s every `expr_str` in the graph JSON; only plain arithmetic on shape symbols may pass."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str" and not (isinstance(value, str) and _is_arithmetic(value)):
                    raise ArtifactError(f"{path}: shape expression {str(value)[:80]!r} in {_GRAPH} is not plain "
                                        f"arithmetic and would be evaluated as Python; refusing it. {_HOW_TO_FIX}")
                stack.append(value)


def _is_arithmetic(expr: str) -> bool:
    expr, pos = expr.strip(), 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            return False
        name, keyword = match[1], match[2]
        if name and not (name in _KEYWORDS if keyword else name in _SYMPY_NAMES or _SYMBOL.fullmatch(name)):
            return False
        pos = match.end()
    return True


@contextlib.contextmanager
def _quiet_torch():
    """Drop torch's multi-line load warnings (a failed load raises one ArtifactError instead)."""
    def drop(record: logging.LogRecord) -> bool:
        return False

    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
