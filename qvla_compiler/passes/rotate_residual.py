"""QuaRot's residual-stream rotation R1 (quantvla.md §10.1), folded into the weights.

Before: x₀ = [projector(v) ; embed(ids)·c], x ← x + o_proj(attn(rms(x)·γ₁)), x ← x + down_proj(mlp(rms(x)·γ₂)),
        ..., then the stream's exit (a final norm returned, a LayerNorm)
After:  every stream value carries x·Qᵀ (Q = H_d orthonormal, hadamard.py): writers (o_proj, down_proj, the projector)
        hold Q·W and Q·b, the embedding table E·Qᵀ, readers (q/k/v, gate/up) W·diag(γ)·Qᵀ with the norm's gain set to
        identity (γ = w ← 1, Gemma's 1 + w ← w = 0), so rms(x·Qᵀ) = rms(x)·Qᵀ needs no op; where the stream leaves
        (the final norm returned, vlln's LayerNorm) one online qvla::hadamard(·, H_mᵀ) un-rotates it.
Invariant: exact in real arithmetic; ops outside a folded stream see the values they saw before.

A stream is grown from an RMS norm's input (pow(x, 2) → mean over channels, or a fused rms_norm) along the ops that
commute with Q — sums, casts, observers, row cat/slice/select, scaling by a number or a per-token [..., 1] tensor, a
fused rms_norm without a gain — and ends at entries (linear outputs, embedding lookups), readers (linears, or a
constant per-channel gain whose consumers are all linears), invariant reads (the pow → mean, dtype/shape checks) and
exits (anything else). A stream with an entry that is none of these (a gated residual `attn · gate`, a placeholder) is
not folded, nor one without a quantized reader. So it covers the language-model backbones of pi05 and groot; LayerNorm
streams (the SigLIP tower: mean-centring does not commute with Q) and AdaLN/adaRMS action heads (time-modulated gains
and gated residuals) keep the per-input Hadamard pair.
Not done: random signs (Q = H·diag(±1) would need a sign flip beside each exit op), the per-head R2 fold into v_proj,
linears that both read and write a stream (rejected).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque

import torch
import torch.fx as fx

from qvla_compiler.quant.hadamard import fast_hadamard, hadamard_base, hadamard_factors, supported_width
from qvla_compiler.meta import info
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.insert_observers import OBSERVER_PREFIX
from qvla_compiler.passes.quantize_linears import _fetch
from qvla_compiler.passes.rotate_common import add_tensor, replace_input, replace_weight, weight_of

RESIDUAL_META = "qvla_residual"
HADAMARD = torch.ops.qvla.hadamard.default
_CASTS = frozenset({g.aten.to.dtype, g.aten._to_copy.default, g.aten.clone.default, g.aten.contiguous.default,
                    g.aten.alias.default, g.aten.detach.default, g.aten.type_as.default})
_ROWS = frozenset({g.aten.cat.default, g.aten.slice.Tensor, g.aten.select.int})  # along a non-channel dim
_SUMS = frozenset({g.aten.add.Tensor, g.aten.sub.Tensor})
_SCALES = frozenset({g.aten.mul.Tensor, g.aten.div.Tensor})
_INVARIANT = frozenset({g.aten._assert_tensor_metadata.default, g.aten.sym_size.int})
_MEANS = frozenset({g.aten.mean.dim, g.aten.sum.dim_IntList})
_RMS_NORM = frozenset({g.aten.rms_norm.default})


class StreamRole(str, enum.Enum):
    MEMBER = "member"  # a stream value computed by an op that commutes with Q (nothing to change)
    ENTRY = "entry"  # embedding lookup: table columns rotated, E·Qᵀ
    WRITER = "writer"  # linear whose output is a stream value: Q·W, Q·b
    READER = "reader"  # linear reading a stream value: W·diag(γ)·Qᵀ
    GAIN = "gain"  # a norm's constant gain, absorbed into its readers and reset to identity
    EXIT = "exit"  # a consumer outside the stream: its stream inputs are un-rotated online


_VALUE_ROLES = frozenset({StreamRole.MEMBER, StreamRole.ENTRY, StreamRole.WRITER, StreamRole.GAIN})


@dataclasses.dataclass(frozen=True)
class StreamTag:
    """What the fold does at one node; stored under node.meta[RESIDUAL_META]."""

    stream: int
    role: StreamRole
    width: int
    gain: str | None = None  # READER / GAIN: attribute path of the norm weight w (γ = w, or 1 + w)
    unit_offset: bool = False  # Gemma's x·(1 + w)
    sources: tuple[str, ...] = ()  # EXIT: names of the stream values it reads


def residual_tag(node: fx.Node) -> StreamTag | None:
    return node.meta.get(RESIDUAL_META)


def annotate_residual_streams(gm: fx.GraphModule) -> int:
    """Decide which residual streams fold (see the module docstring); tag their nodes. Returns how many."""
    count, seen = 0, set()
    for seed in _rms_inputs(gm):
        width = seed.meta["val"].shape[-1]
        if seed in seen or not supported_width(width):
            continue
        tags = _grow(seed, width)
        seen.update(tags or (seed,))
        if tags is None or any(residual_tag(n) is not None for n in tags) or not any(
                t.role is StreamRole.READER and info(n) is not None and info(n).is_quantized for n, t in tags.items()):
            continue  # not foldable, overlapping a folded stream, or nothing quantized reads it
        for node, tag in tags.items():
            node.meta[RESIDUAL_META] = dataclasses.replace(tag, stream=count)
        count += 1
    return count


def rotate_residual(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold Q into every tagged node's weights, reset the gains, un-rotate at the exits (reads annotations only)."""
    tagged = [(n, residual_tag(n)) for n in list(gm.graph.nodes) if residual_tag(n) is not None]
    values, exits = {n.name: n for n, _ in tagged}, {}
    for node, tag in tagged:
        if tag.role is StreamRole.READER:
            gain = _gamma(gm, tag) if tag.gain is not None else 1.0
            # W' = W·diag(γ)·Qᵀ, x' = rms(x)·Qᵀ  ⇒  x'W'ᵀ = rms(x)·diag(γ)·Wᵀ
            replace_weight(gm, node, lambda: fast_hadamard(weight_of(gm, node).double() * gain, dim=-1))
        elif tag.role is StreamRole.WRITER:
            # y' = y·Qᵀ = x·(Q·W)ᵀ + Q·b
            replace_weight(gm, node, lambda: fast_hadamard(weight_of(gm, node).double(), dim=0))
            if len(node.args) > 2 and node.args[2] is not None:
                bias = node.args[2]
                replace_input(gm, node, bias, fast_hadamard(_fetch(gm, bias).double(), dim=0), bias.target)
        elif tag.role is StreamRole.ENTRY:
            table = node.args[0]  # row r of the table is a stream value: r' = r·Qᵀ
            replace_input(gm, node, table, fast_hadamard(_fetch(gm, table).double(), dim=-1), table.target)
        elif tag.role is StreamRole.EXIT:
            for name in tag.sources:  # one un-rotation per stream value, shared by all its exits
                if name not in exits:
                    exits[name] = _unrotate(gm, values[name], node, tag.width)
                node.replace_input_with(values[name], exits[name])
    for node, tag in tagged:  # after the readers, which fetched γ
        if tag.role is StreamRole.GAIN:
            attr, reader, _ = _gain_split(node, tag.width)[1]
            identity = torch.zeros if tag.unit_offset else torch.ones  # 1 + 0 = 1, or 1
            replace_input(gm, reader, attr, identity(attr.meta["val"].shape, dtype=torch.float64), attr.target)
    gm.graph.lint()
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------------------- deciding
def _rms_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """x of every pow(x, 2) whose only readers average it over the channel dim (an RMS norm's statistic), and of
    every fused rms_norm (nn.RMSNorm, F.rms_norm) over the channel dim."""
    return [n.args[0] for n in gm.graph.nodes if _sum_of_squares(n) or _fused_rms(n)]


def _fused_rms(node: fx.Node) -> bool:
    """aten.rms_norm(x, [d], w, eps) normalising over x's channel dim d: rms(x·Qᵀ) = rms(x), so it commutes with Q
    once its gain w is folded into the readers (a GAIN) or when it has none (a MEMBER)."""
    return g.normalises_channels(node, _RMS_NORM)


def _sum_of_squares(node: fx.Node) -> bool:
    if not (_is(node, {g.aten.pow.Tensor_Scalar}) and node.args[1] == 2 and node.users):
        return False
    ndim = node.meta["val"].dim()
    return all(_is(u, _MEANS) and [d % ndim for d in u.args[1]] == [ndim - 1] for u in node.users)


def _grow(seed: fx.Node, width: int) -> dict[fx.Node, StreamTag] | None:
    """Every node the stream through `seed` touches, with its role; None when some entry cannot be folded."""
    tags: dict[fx.Node, StreamTag] = {}
    queue = deque([seed])
    while queue:
        value = queue.popleft()
        if value in tags and tags[value].role in _VALUE_ROLES:
            continue
        tag = None if value in tags else _produced_as(value, width)  # a READER/EXIT cannot also be a value
        if tag is None:
            return None
        tags[value] = tag
        if tag.role is StreamRole.MEMBER:
            queue.extend(_stream_args(value, width))
        elif tag.role is StreamRole.GAIN:
            queue.append(_gain_split(value, width)[0])
        for user in value.users:
            if user in tags and tags[user].role in _VALUE_ROLES:  # reached first from another input
                if value in _carried(user, width) or _invariant_read(user, value):
                    continue
                return None  # e.g. a linear that both reads and writes the stream
            if user in tags and tags[user].role is StreamRole.READER:
                continue
            if value in (_stream_args(user, width) or ()) or _folds_gain(user, width, value):
                queue.append(user)
            elif not _invariant_read(user, value):
                _read(tags, user, value, width)
    return tags


def _produced_as(node: fx.Node, width: int) -> StreamTag | None:
    """How `node`'s value can carry the stream: an op commuting with Q, a foldable entry, a folded gain; or None."""
    if not _full(node, width):
        return None
    if _stream_args(node, width) is not None:
        return StreamTag(0, StreamRole.MEMBER, width)
    if g.is_linear(node) and _attr(node.args[1]):
        return StreamTag(0, StreamRole.WRITER, width)
    if _is(node, {g.aten.embedding.default}) and _attr(node.args[0]):
        return StreamTag(0, StreamRole.ENTRY, width)
    if _folds_gain(node, width):
        _, (attr, _, offset) = _gain_split(node, width)
        return StreamTag(0, StreamRole.GAIN, width, attr.target, offset)
    return None


def _carried(node: fx.Node, width: int) -> list[fx.Node]:
    split = _gain_split(node, width)
    return _stream_args(node, width) or ([split[0]] if split is not None else [])


def _folds_gain(node: fx.Node, width: int, value: fx.Node | None = None) -> bool:
    return _gain_split(node, width, value) is not None and _gain_readers(node)


def _read(tags: dict[fx.Node, StreamTag], user: fx.Node, value: fx.Node, width: int) -> None:
    """Tag `user`, a consumer of the stream value `value` that is not itself a stream value: READER or EXIT."""
    if g.is_linear(user) and user.args[0] is value and value not in user.args[1:] and _attr(user.args[1]):
        source = value
        while source in tags and tags[source].role is StreamRole.MEMBER and _passthrough(source):
            source = source.args[0]
        gain = tags.get(source, StreamTag(0, StreamRole.MEMBER, width))
        tags[user] = StreamTag(0, StreamRole.READER, width, gain.gain, gain.unit_offset)
        return
    old = tags.get(user, StreamTag(0, StreamRole.EXIT, width))
    tags[user] = dataclasses.replace(old, sources=tuple(dict.fromkeys(old.sources + (value.name,))))


def _stream_args(node: fx.Node, width: int) -> list[fx.Node] | None:
    """The inputs carrying the stream when `node` commutes with Q (rotated inputs → rotated output), else None."""
    if _passthrough(node):
        return [node.args[0]]
    if node.op != "call_function" or not _full(node, width):
        return None
    if _fused_rms(node) and (len(node.args) < 3 or node.args[2] is None):
        return [node.args[0]]
    if node.target in _SUMS and all(_full(a, width) for a in node.args[:2]):
        return list(node.args[:2])
    if node.target in _ROWS:
        inputs = list(node.args[0]) if node.target == g.aten.cat.default else [node.args[0]]
        ndim = inputs[0].meta["val"].dim() if _full(inputs[0], width) else 0
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return inputs if ndim and dim % ndim != ndim - 1 and all(_full(a, width) for a in inputs) else None
    if node.target in _SCALES:
        a, b = node.args[:2]
        if _full(a, width) and _per_token(b):
            return [a]
        if node.target == g.aten.mul.Tensor and _full(b, width) and _per_token(a):
            return [b]
    return None


def _passthrough(node: fx.Node) -> bool:
    """Casts and observers: the value, unchanged up to dtype."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return str(node.target).startswith(OBSERVER_PREFIX)
    return _is(node, _CASTS) and isinstance(node.args[0], fx.Node)


def _invariant_read(user: fx.Node, value: fx.Node) -> bool:
    """Reads that only see what Q preserves: dtype/shape checks, a type_as's template, the RMS statistic."""
    if _is(user, _INVARIANT) or _is(user, {g.aten.type_as.default}) and user.args[0] is not value:
        return True
    return _sum_of_squares(user)


def _gain_split(node: fx.Node, width: int, value: fx.Node | None = None):
    """(x, (get_attr w, the node reading w, unit offset)) when `node` = x·γ, γ = w or 1 + w a constant per-channel
    gain (through casts) and x a full-width activation (`value` if given), else None."""
    if _fused_rms(node) and len(node.args) > 2 and node.args[2] is not None:
        source = _gain_source(node.args[2], width, node)
        return (node.args[0], source) if source is not None and value in (None, node.args[0]) else None
    if not _is(node, {g.aten.mul.Tensor}):
        return None
    for x, gain in (node.args[:2], node.args[1::-1]):
        source = _gain_source(gain, width, node)
        if source is not None and _full(x, width) and _gain_source(x, width, node) is None and x is (value or x):
            return x, source
    return None


def _gain_source(node, width: int, reader: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    offset = False
    if _is(node, {g.aten.add.Tensor}) and node.args[1] == 1.0:
        node, reader, offset = node.args[0], node, True
    while _passthrough(node) and not _is(node, {g.aten.type_as.default}):
        node, reader = node.args[0], node
    if not _attr(node) or tuple(node.meta["val"].shape) != (width,):
        return None
    return node, reader, offset


def _gain_readers(node: fx.Node) -> bool:
    """True when every consumer of the gain's output (through casts and observers) is a linear reading it."""
    found, queue = False, deque([node])
    while queue:
        n = queue.popleft()
        for user in n.users:
            if _passthrough(user) and user.args[0] is n:
                queue.append(user)
            elif g.is_linear(user) and user.args[0] is n and _attr(user.args[1]):
                found = True
            elif not _invariant_read(user, n):
                return False
    return found


def _gamma(gm: fx.GraphModule, tag: StreamTag) -> torch.Tensor:
    w = gm
    for part in tag.gain.split("."):
        w = getattr(w, part)
    return 1.0 + w.double() if tag.unit_offset else w.double()


def _full(node, width: int) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[-1] == width


def _per_token(node) -> bool:
    if isinstance(node, (int, float)):
        return True
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and (val.dim() == 0 or val.shape[-1] == 1)


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


# ------------------------------------------------------------------------------------------------------ rewriting
def _unrotate(gm: fx.GraphModule, value: fx.Node, before: fx.Node, width: int) -> fx.Node:
    """qvla::hadamard(value·Qᵀ, H_mᵀ, 1/√d) = value: Qᵀ = (H_mᵀ ⊗ H_{2^k})/√d, Sylvester being symmetric."""
    m, _ = hadamard_factors(width)
    had = None
    if m > 1:
        had = add_tensor(gm, "residual_exit_had", hadamard_base(m).T.to(value.meta["val"].dtype), before)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(HADAMARD, (value, had, 1.0 / math.sqrt(width)))
    node.meta["val"] = value.meta["val"]
    return node
