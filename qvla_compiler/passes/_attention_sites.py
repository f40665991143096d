"""Attention sites: one attention core with the q and o projections that serve it, found from annotations.

Shared by observe_attention and fold_attention_scales. A site is read from LinearInfo (role, block, region) that
classify_linears / assign_regions wrote, so it works on float graphs and on lowered graphs alike (lowering copies the
annotation onto the qvla:: linear node). Block b is the b-th core of find_attention_cores, as in classify_linears (a
core sharing its query with an earlier one, as Wan I2V's image attention, joins that core's block: no site of its own).
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from qvla_compiler.meta import LinearInfo, Region, Role
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.classify_linears import AttentionCore, find_attention_cores

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    block: int
    core: AttentionCore
    q_linears: tuple[fx.Node, ...]  # role attn_q (attn_qkv sites are listed but cannot take α)
    o_linears: tuple[fx.Node, ...]
    heads: int | None
    head_dim: int | None
    region: Region | None

    @property
    def is_sdpa(self) -> bool:
        return g.is_sdpa(self.sdpa_node)

    @property
    def sdpa_node(self) -> fx.Node:
        out = self.core.out
        return out.args[0] if out.target is g.operator.getitem else out

    @property
    def fused_qkv(self) -> bool:
        return any(n.meta["qvla"].role is Role.ATTN_QKV for n in self.q_linears)


def _annotated(node: fx.Node) -> LinearInfo | None:
    value = node.meta.get("qvla")
    return value if isinstance(value, LinearInfo) and node.op == "call_function" else None


def attention_sites(gm: fx.GraphModule, regions: tuple[Region, ...] | None = None) -> list[AttentionSite]:
    """Every attention core of `gm` (optionally only those whose query projection is in `regions`)."""
    by_block: dict[int, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        info = _annotated(node)
        if info is None or info.block < 0 or not info.role.is_attention:
            continue
        kind = "o" if info.role is Role.ATTN_O else "q" if info.role in (Role.ATTN_Q, Role.ATTN_QKV) else None
        if kind:
            by_block.setdefault(info.block, {"q": [], "o": []})[kind].append(node)
    sites = []
    for block, core in enumerate(find_attention_cores(gm)):
        found = by_block.get(block, {"q": [], "o": []})
        q_info = found["q"][0].meta["qvla"] if found["q"] else None
        region = q_info.region if q_info else None
        if regions is not None and region not in regions:
            continue
        sites.append(AttentionSite(block, core, tuple(found["q"]), tuple(found["o"]),
                                   q_info.heads if q_info else None, q_info.head_dim if q_info else None, region))
    # a flex_attention core's score_mod edits the logits that ATM / OHB read: no site, no α or β
    return [site for site in sites if not g.is_flex_attention(site.sdpa_node)]


def sdpa_arguments(node: fx.Node) -> dict:
    """The SDPA call's arguments by name, defaults filled in."""
    values = dict(zip(SDPA_ARGS, node.args))
    values.update(node.kwargs)
    for name, default in (("attn_mask", None), ("is_causal", False), ("scale", None), ("enable_gqa", False)):
        values.setdefault(name, default)
    return values


def softmax_of(site: AttentionSite) -> fx.Node | None:
    """The softmax of an explicit core: walk back from the P·V product's first operand through layout ops."""
    probs = g.matmul_operands(site.core.out)[0]
    found = g.walk([probs], g.inputs_of, lambda n: n.op == "call_function" and n.target in g.SOFTMAX_OPS,
                   g.op_in(g.LAYOUT_OPS))[0]
    return next(iter(found)) if len(found) == 1 else None
