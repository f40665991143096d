"""Classify every linear by graph structure: attention q/k/v/o (or fused qkv), MLP, or other.

Before: aten.linear nodes with no qvla annotation.
After:  every aten.linear carries LinearInfo(role, block, heads, head_dim, mlp_part); the graph is unchanged.
How:    attention cores are found first, in both forms: fused (SDPA, flex_attention), and matmul → scale/mask →
        softmax → matmul. Walking back from a core's q/k/v operands (through RoPE, q/k-norm, GQA repeats, KV
        concatenation, splits) reaches the projections; walking forward from its output through reshapes (and
        sums of attention outputs: one query serving two cores, as Wan I2V / IP-Adapter, is one block) reaches
        o_proj. Matmul-like ops (matmul, bmm, baddbmm, two-operand einsum) and pointwise masking (scale, add,
        where, masked_fill) are tables in _graph. An MLP block is a down projection whose input is a pointwise
        function (a norm over the channels allowed) of up projections only, and whose output (possibly gated,
        or summed with other branches such as parallel attention or routed experts) is added back onto the
        residual stream the up projections read; experts stacked in one weight (canonicalize_linears: one
        linear per expert) form one block whose downs all read the stack of ups. Up projections concatenated
        beside an attention output into one output projection (Flux's single-stream blocks) are MLP; that
        projection stays attn_o in no attention block. Everything else is `other`.
Expects a functional graph (run normalize_graph first: in-place ops would hide the dataflow).
Invariant: module names are never read, except through the recipe's explicit role overrides.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from qvla_compiler.meta import LinearInfo, Role, annotate, update
from qvla_compiler.passes import _graph as g

# gates, branch sums (experts' sum over their stack too), experts picked per token by where, and the residual add
_RESIDUAL_PATH = g.LAYOUT_OPS | {g.aten.mul.Tensor, g.aten.sum.dim_IntList, g.aten.where.self} | g.ADD_OPS
_VIEWS = g.LAYOUT_OPS | {g.operator.getitem}


@dataclasses.dataclass(frozen=True)
class AttentionCore:
    q: fx.Node  # operand nodes as the core sees them
    k: fx.Node
    v: fx.Node
    out: fx.Node


def find_attention_cores(gm: fx.GraphModule) -> list[AttentionCore]:
    """Every attention in graph order, in either form."""
    cores = []
    for node in gm.graph.nodes:
        if g.is_sdpa(node) or g.is_flex_attention(node):
            out = next((u for u in node.users if u.target is g.operator.getitem and u.args[1] == 0), node)
            cores.append(AttentionCore(*node.args[:3], out=out))
        elif node.op == "call_function" and node.target in g.SOFTMAX_OPS:
            core = _explicit_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _explicit_core(softmax: fx.Node) -> AttentionCore | None:
    scores = g.walk([softmax.args[0]], g.inputs_of, _is_matmul, _elementwise)[0]
    pv = g.walk(softmax.users, lambda n: n.users, _is_matmul, _passable(g.LAYOUT_OPS))[0]
    if len(scores) != 1 or len(pv) != 1:
        return None
    (qk,), (pv,) = scores, pv
    (q, k), (_, v) = g.matmul_operands(qk), g.matmul_operands(pv)
    return AttentionCore(q=q, k=k, v=v, out=pv)


def classify_linears(gm: fx.GraphModule, role_overrides: tuple = ()) -> fx.GraphModule:
    """Annotate every aten.linear in `gm` with its structural role; see the module docstring."""
    prefix = gm.meta.get("qvla_param_prefix", "")
    for node in g.linear_nodes(gm):
        out_f, in_f = node.args[1].meta["val"].shape
        annotate(node, LinearInfo(module_path=_module_path(node, prefix), in_features=in_f, out_features=out_f))
    cores = find_attention_cores(gm)
    outs = {core.out for core in cores}
    for block, core in enumerate(cores):
        _annotate_attention(core, block, outs)
    blocks = 0
    for node in g.linear_nodes(gm):
        if node.meta["qvla"].role is Role.OTHER and _annotate_mlp(node, blocks) == blocks:
            blocks += 1  # a new block (a further expert's down joins its block and returns that block's index)
    for node in g.linear_nodes(gm):  # Flux's single-stream blocks: out(cat([attention, act(mlp(x))]))
        if node.meta["qvla"].role is Role.ATTN_O and (ups := _mlp_beside_attention(node, outs)):
            for up in ups:
                update(up, role=Role.MLP, block=blocks, mlp_part="up")
            update(node, block=-1, heads=None)  # no attention site: OHB's β would scale the MLP half too
            blocks += 1
    for node in g.linear_nodes(gm):
        forced = _override(node.meta["qvla"].module_path, role_overrides)
        if forced is not None:
            update(node, role=Role(forced))
    return gm


def _annotate_attention(core: AttentionCore, block: int, outs: set[fx.Node]) -> None:
    head_dim = core.q.meta["val"].shape[-1]
    found = {r: g.producers(operand, _passable_back)[0] for r, operand in
             ((Role.ATTN_Q, core.q), (Role.ATTN_K, core.k), (Role.ATTN_V, core.v))}
    # one query serving two cores whose outputs are summed (Wan I2V's image and text K/V, IP-Adapter): one block
    block = min((q.meta["qvla"].block for q in found[Role.ATTN_Q] if q.meta["qvla"].block >= 0), default=block)
    fused = found[Role.ATTN_Q] & found[Role.ATTN_K] & found[Role.ATTN_V]
    fused_kv = found[Role.ATTN_K] & found[Role.ATTN_V] - fused
    for role, linears in found.items():
        for lin in linears:
            if role is not Role.ATTN_Q and lin.meta["qvla"].block not in (-1, block):
                continue  # K/V of an earlier block that a later query reads too (a prefix's KV in joint attention)
            final = Role.ATTN_QKV if lin in fused else Role.ATTN_KV if lin in fused_kv else role
            update(lin, role=final, block=block, head_dim=head_dim, heads=lin.meta["qvla"].out_features // head_dim)

    def to_output(node: fx.Node) -> bool:  # reshapes, a sub-LN norm, and sums of attention outputs only
        return _passable(g.LAYOUT_OPS)(node) or g.normalises_channels(node) or node.target in g.ADD_OPS and all(
            _unviewed(a) in outs for a in node.args if isinstance(a, fx.Node))

    for lin in g.consumers(core.out, to_output):
        update(lin, role=Role.ATTN_O, block=block, head_dim=head_dim, heads=lin.meta["qvla"].in_features // head_dim)


def _unviewed(node: fx.Node) -> fx.Node:
    """The value `node` moves or reshapes; a cat / stack (reading a list) is a value of its own."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _mlp_beside_attention(o_proj: fx.Node, outs: set[fx.Node]) -> set[fx.Node]:
    """Up projections concatenated beside an attention output into one output projection, e.g. Flux's
    `proj_out(cat([attn, gelu(proj_mlp(x))]))`; empty for a plain o_proj."""
    cat = _unviewed(o_proj.args[0])
    if cat.target != g.aten.cat.default or not any(_unviewed(a) in outs for a in cat.args[0]):
        return set()
    ups = set()
    for part in (a for a in cat.args[0] if _unviewed(a) not in outs):
        linears, blocked = g.producers(part, _elementwise)
        if linears and all(u.meta["qvla"].role is Role.OTHER for u in linears) and all(map(g.is_constant, blocked)):
            ups |= linears
    return ups


def _annotate_mlp(down: fx.Node, block: int) -> int | None:
    """Annotate `down` and its up projections as MLP block `block`, or as a further down projection of the block
    its ups already form (experts stacked in one weight: every expert's down reads the stack of all ups). Returns the
    block, or None when `down` is not an MLP's down projection."""
    ups, blocked = g.producers(down.args[0], _per_token)
    if not ups or any(not g.is_constant(b) for b in blocked) or len({_viewed(u.args[0]) for u in ups}) != 1:
        return None
    owners = {(u.meta["qvla"].role, u.meta["qvla"].mlp_part, u.meta["qvla"].block) for u in ups}
    if len(owners) != 1 or next(iter(owners))[:2] not in ((Role.OTHER, None), (Role.MLP, "up")):
        return None
    if not _adds_back_to_residual(down, next(iter(ups)).args[0]):
        return None
    role, _, owner = next(iter(owners))
    block = owner if role is Role.MLP else block
    for up in ups:
        update(up, role=Role.MLP, block=block, mlp_part="up")
    update(down, role=Role.MLP, block=block, mlp_part="down")
    return block


def _viewed(node: fx.Node) -> fx.Node:
    """The tensor `node` is a view or slice of (the ups of stacked experts read one expert's rows each)."""
    while node.op == "call_function" and node.target in (g.aten.select.int, g.aten.view.default, g.aten.repeat.default):
        node = node.args[0]
    return node


def _adds_back_to_residual(down: fx.Node, block_input: fx.Node) -> bool:
    """Does the down projection's output (through gates and branch sums) reach an add one of whose other summands
    the block's input was computed from? Parallel blocks add x + attn(ln(x)) + mlp(ln(x)); experts add up first."""
    upstream, downstream = g.ancestors(block_input), g.descendants(down)

    def residual_add(node: fx.Node) -> bool:
        others = [a for a in node.args if isinstance(a, fx.Node) and a not in downstream]
        return node.target in g.ADD_OPS and any(t in upstream for o in others for t in _summands(o, downstream))

    return bool(g.walk(down.users, lambda n: n.users, residual_add, _passable(_RESIDUAL_PATH))[0])


def _summands(node: fx.Node, downstream: set[fx.Node]) -> set[fx.Node]:
    """`node` and, if it is a sum, the terms it adds up (not those computed from the down projection), seen through
    copies and casts (SmolVLA adds its MLP onto `out_emb.clone()`)."""
    terms, queue = set(), [node]
    while queue:
        n = queue.pop()
        if n in terms:
            continue
        terms.add(n)
        if n.op == "call_function" and n.target in g.ADD_OPS:
            queue.extend(a for a in n.args if isinstance(a, fx.Node) and a not in downstream)
        elif n.op == "call_function" and n.target in g.IDENTITY_OPS and isinstance(n.args[0], fx.Node):
            queue.append(n.args[0])
    return terms


def _passable(ops: frozenset):
    return g.op_in(ops)


def _passable_back(node: fx.Node) -> bool:
    """Walking back from a q/k/v operand: anything but another attention core or a graph input."""
    if node.op != "call_function":
        return False
    return not (g.is_sdpa(node) or g.is_flex_attention(node) or node.target in g.SOFTMAX_OPS or _is_matmul(node))


def _is_matmul(node: fx.Node) -> bool:
    return g.matmul_operands(node) is not None


def _elementwise(node: fx.Node) -> bool:
    return g.is_pointwise(node) or g.op_in(g.LAYOUT_OPS)(node)


def _per_token(node: fx.Node) -> bool:
    """Pointwise, or a fused norm over the channel dim: an MLP's hidden activation (or an attention output) may be
    normalised before the down (output) projection: timm's Mlp(norm_layer=…), EVA-02's SwiGLU, sub-LN."""
    return _elementwise(node) or g.normalises_channels(node)


def _module_path(node: fx.Node, prefix: str) -> str:
    target = node.args[1].target if node.args[1].op == "get_attr" else node.args[1].name
    path = target.removesuffix(".weight")
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _override(path: str, overrides: tuple) -> str | None:
    hits = [(p, v) for p, v in overrides if path == p or path.startswith(p + ".")]
    return max(hits, key=lambda h: len(h[0]))[1] if hits else None
