"""The `.pt2` program archive: byte-reproducible, atomic writes and data-only reads.

Layout (torch's pt2 archive of one or more exported programs, each under a model name <m> — "model" for a plain
module, "prefix" and "denoise" for a policy — every member under one root folder):
  models/<m>.json                    the graph, JSON       data/sample_inputs/<m>.pt   torch.save'd (args, kwargs)
  data/weights/<m>_weights_config.json, data/constants/<m>_constants_config.json   fqn -> file, dtype, shape
  data/weights/weight_<i>, data/constants/tensor_<i>   raw tensor bytes      extra/<name>   UTF-8 text (qvla/*.json)
  archive_format, archive_version, byteorder, .data/version, .data/serialization_id     bookkeeping

Why not torch.export.load: it unpickles with weights_only=False (sample inputs after a failed safe load, weights and
constants flagged use_pickle, custom/opaque objects, legacy members), dlopens AOTInductor members, and sympify()s
(eval) shape expressions from the JSON. read_archive reads the members itself, admits only raw tensors, JSON and a
weights_only=True pickle of the sample inputs, checks every shape expression, and hands torch's deserializer
ready-made tensors, so none of those paths can be reached. (A graph node calling a Python function instead of an
operator is refused by torch's own ExportedProgram verifier.) `trust=True` uses torch's load_pt2 as is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import json
import logging
import os
import re
import secrets
import tempfile
import types
import typing
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import torch
import torch.utils._sympy.functions as sympy_functions
from sympy.core.assumptions import _assume_defined
from torch._export.serde import schema, serialize
from torch._export.serde.union import _Union
from torch.export.pt2_archive import PT2ArchiveWriter
from torch.export.pt2_archive import constants as pt2
from torch.export.pt2_archive._package import load_pt2, package_pt2

from qvla_compiler.errors import ArtifactError

_MODEL = "model"  # the name torch.export.save gives a single program
_TMP_SUFFIX = ".tmp.pt2"
_SPOOL_BYTES = 64 << 20  # archives up to this size are staged in memory, larger ones in an unnamed temporary file
_WEIGHTS = (pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHT_FILENAME_PREFIX)
_CONSTANTS = (pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
_MODEL_GRAPH = re.compile(re.escape(pt2.MODELS_DIR) + r"([A-Za-z_][A-Za-z0-9_]{0,63})\.json")
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


Programs = dict[str, torch.export.ExportedProgram]


def write_archive(programs: torch.export.ExportedProgram | Programs, path: str | os.PathLike,
                  extra_files: dict[str, str]) -> Path:
    """Write one exported program (stored as "model") or several ({name: program}) to `path`, byte-reproducibly
    and atomically.

    The archive is packed straight into `<path>.<pid>.<random>.tmp.pt2` with its root folder always "archive", not
    the temp name, and the graph ids torch records as provenance (memory addresses) renumbered; then it is renamed
    over `path`. Any exception, KeyboardInterrupt included, removes the temp file and leaves a previous `path`
    untouched. Temp files of dead processes (SIGKILL) are removed first.
    """
    path = Path(path)
    if isinstance(programs, torch.export.ExportedProgram):
        programs = {_MODEL: programs}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    # torch's archive is staged in memory only while small: a full-size program (GBs of weights) spills to a
    # temporary file beside `path` instead of holding a second copy of every weight in RAM (RESULTS §14)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES, dir=path.parent) as raw:
        try:
            package_pt2(raw, exported_programs=programs, extra_files=extra_files)
        except serialize.SerializeError as exc:
            raise ArtifactError(
                f"torch.export cannot serialize this program, so {path} was not written (a file already there is "
                f"untouched; the quantized program still runs in memory): {str(exc).splitlines()[0][:300]}. Known "
                f"case in torch {torch.__version__}: flex_attention, whose block mask the serializer refuses; write "
                "that attention with F.scaled_dot_product_attention to save the program") from exc
        try:
            with open(tmp, "wb") as f:
                _repack(raw, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _repack(raw: typing.IO[bytes], out) -> None:
    """Copy torch's archive member by member under the root "archive", graph ids renumbered (see _stable_graph_ids)."""
    with zipfile.ZipFile(raw) as archive, PT2ArchiveWriter(out) as writer:
        for info in archive.infolist():
            name = info.filename.split("/", 1)[1]
            if name not in _WRITER_OWNED:
                data = archive.read(info)
                writer.write_bytes(name, _stable_graph_ids(data) if _MODEL_GRAPH.fullmatch(name) else data)


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
                 ) -> tuple[Programs, dict[str, str]]:
    """Load every program in the archive ({model name: ExportedProgram}, in archive order) and the named extra files
    (missing ones are absent from the dict).

    Data only unless `trust`: a member that would need unpickling arbitrary objects, an unknown member or a shape
    expression that is not arithmetic raises ArtifactError, as does any damage to the archive.
    """
    path = Path(path)
    with _quiet_torch():
        try:
            if trust:
                contents = load_pt2(path)
                return contents.exported_programs, {k: v for k, v in contents.extra_files.items()
                                                    if k in set(extra_names) and v}
            return _read_data_only(path, tuple(extra_names))
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged archive can fail anywhere in torch's deserializer
            raise ArtifactError(f"{path} is not a readable .pt2 program ({type(exc).__name__}: "
                                f"{str(exc)[:300]}). Re-create it with `qvla quantize`.") from exc


def _read_data_only(path: Path, extra_names: tuple[str, ...]) -> tuple[Programs, dict[str, str]]:
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        root, models = _check_members(zf, path, extra_names)
        names = {info.filename[len(root):] for info in zf.infolist()}

        def read(name: str) -> bytes:
            return zf.read(root + name)

        if read(pt2.ARCHIVE_FORMAT_PATH) != pt2.ARCHIVE_FORMAT_VALUE.encode():
            raise ArtifactError(f"{path} is a zip file but not a .pt2 archive. Re-create it with `qvla quantize`.")
        if read(pt2.ARCHIVE_VERSION_PATH) != pt2.ARCHIVE_VERSION_VALUE.encode():
            raise ArtifactError(f"{path} has .pt2 archive version {read(pt2.ARCHIVE_VERSION_PATH)[:20]!r}; this "
                                f"torch reads {pt2.ARCHIVE_VERSION_VALUE!r}. Re-create it with `qvla quantize`.")
        parts = {}
        for model in models:
            graph_name, inputs_name = pt2.MODELS_FILENAME_FORMAT.format(model), _sample_inputs_name(model)
            graph = json.loads(read(graph_name))
            _check_expressions(graph, path, graph_name)
            parts[model] = (graph, _tensors(read, names, _WEIGHTS, model, path),
                            _tensors(read, names, _CONSTANTS, model, path),
                            _sample_inputs(read(inputs_name), path, inputs_name) if inputs_name in names else None)
        extras = {n: read(pt2.EXTRA_DIR + n).decode("utf-8") for n in extra_names if pt2.EXTRA_DIR + n in names}
    programs = {}
    for model, (graph, state_dict, constants, inputs) in parts.items():
        serialized = _to_dataclass(schema.ExportedProgram, graph)
        programs[model] = serialize.ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, inputs)
    return programs, extras


def _to_dataclass(cls, data):
    """torch's serialize._dict_to_dataclass (JSON -> schema dataclasses), with each class's type hints computed once
    instead of once per object (that lookup is ~40% of reading a program)."""
    cls = serialize._resolve_schema_cls(cls)
    if isinstance(cls, str):
        raise TypeError(f"unresolved schema type {cls!r}")
    origin = typing.get_origin(cls)
    if origin is typing.Annotated:
        return _to_dataclass(cls.__origin__, data)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        inner, _ = typing.get_args(cls)  # Optional[X]
        return None if data is None else _to_dataclass(inner, data)
    if isinstance(cls, type) and issubclass(cls, _Union):
        [(kind, value)] = data.items()  # a tagged union: exactly one field is set
        return cls.create(**{kind: _to_dataclass(_type_hints(cls)[kind], value)})
    if dataclasses.is_dataclass(cls):
        hints = _type_hints(cls)
        return cls(**{f.name: _to_dataclass(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)
                      if f.name in data})
    if isinstance(data, list):
        return [_to_dataclass(typing.get_args(cls)[0], d) for d in data] if data else data
    if isinstance(data, dict):
        return {k: _to_dataclass(typing.get_args(cls)[1], v) for k, v in data.items()}
    return float(data) if cls is float else data


@functools.cache
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls, globalns=vars(schema))


def _sample_inputs_name(model: str) -> str:
    return pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)


def _model_members(model: str) -> tuple[str, str, str]:
    """The members a program needs: its graph, weights config and constants config."""
    return (pt2.MODELS_FILENAME_FORMAT.format(model), _WEIGHTS[1].format(model), _CONSTANTS[1].format(model))


def _check_members(zf: zipfile.ZipFile, path: Path, extra_names: tuple[str, ...]) -> tuple[str, list[str]]:
    """Every member sits under one root, appears once, is stored uncompressed and is one we know how to read; returns
    the root and the model names (one per models/<name>.json), in archive order."""
    infos = zf.infolist()
    root = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    present = [info.filename[len(root):] for info in infos]
    models = [m[1] for m in map(_MODEL_GRAPH.fullmatch, present) if m]
    allowed = {*_BOOKKEEPING, *(pt2.EXTRA_DIR + n for n in extra_names),
               *(name for m in models for name in (*_model_members(m), _sample_inputs_name(m)))}
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
    needed = (pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, *(n for m in models for n in _model_members(m)))
    for name in needed if models else (*needed, pt2.MODELS_FILENAME_FORMAT.format(_MODEL)):
        if name not in present:
            raise ArtifactError(f"{path} is not a complete .pt2 program: member {name!r} is missing. "
                                "Re-create it with `qvla quantize`.")
    return root, models


def _tensors(read, names: set[str], kind: tuple[str, str, str], model: str, path: Path) -> dict[str, torch.Tensor]:
    """Raw tensors named by a model's payload config; aliasing entries share one storage as torch's loader does."""
    directory, config_format, prefix = kind
    config = _to_dataclass(schema.PayloadConfig, json.loads(read(config_format.format(model))))
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
        # no buffer needs grad; a cache saved requiring it (written outside no_grad) refused the next in-place write
        out[fqn] = torch.nn.Parameter(t, requires_grad=tm.requires_grad) if meta.is_param else t
    return out


def _sample_inputs(data: bytes, path: Path, member: str) -> tuple:
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, or anything a damaged stream raises
        raise ArtifactError(f"{path}: member {member!r} is not plain tensor data (weights_only load "
                            f"failed: {type(exc).__name__}); refusing to unpickle it. {_HOW_TO_FIX}") from exc
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
        raise ArtifactError(f"{path}: member {member!r} holds {type(inputs).__name__}, not (args, kwargs). "
                            f"{_HOW_TO_FIX}")
    return inputs


def _check_expressions(node, path: Path, member: str) -> None:
    """torch sympify()s every `expr_str` in the graph JSON; only plain arithmetic on shape symbols may pass."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str" and not (isinstance(value, str) and _is_arithmetic(value)):
                    raise ArtifactError(f"{path}: shape expression {str(value)[:80]!r} in {member} is not plain "
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
