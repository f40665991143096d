"""Decisions the passes record on graph nodes.

Every decision is a frozen dataclass stored under one key, `node.meta[QVLA_META]`. Deciding passes
(`classify_linears`, `assign_regions`, `apply_layout`, `quantize_linears`) replace the annotation with an updated
copy; rewriting passes (`insert_observers`, `lower_linears`) only read it. Nothing downstream re-derives a decision.
"""
from __future__ import annotations

import dataclasses
import enum

import torch.fx as fx

from qvla_compiler.errors import QvlaError

QVLA_META = "qvla"
STEP_BOUNDS = "qvla_step_bounds"  # graph buffer, fp32 [S-1]: the flow-time bounds per-step scale tables are indexed by
INPUTS_KEY = "qvla_inputs"  # graph.meta: one role per flat input, set at capture, read by assign_regions
INPUT_ROLES = ("image", "text", "state", "prefix", "action", "time", "input")


class InputRoleError(QvlaError, ValueError):
    """capture_module's input_roles names an argument forward does not take, or a role that does not exist."""



class Role(str, enum.Enum):
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_QKV = "attn_qkv"  # one fused linear whose output is split into q, k and v
    ATTN_KV = "attn_kv"  # one fused linear split into k and v (cross-attention, MHA with query ≠ key)
    MLP = "mlp"
    OTHER = "other"  # embeddings, heads, timestep MLPs, adaRMS/AdaLN modulation, projectors

    @property
    def is_attention(self) -> bool:
        return self.value.startswith("attn_")


class Region(str, enum.Enum):
    VISION = "vision"  # the backbone's vision tower: depends on the images and nothing else
    BACKBONE = "backbone"  # the language model and whatever else runs once per observation
    ACTION_HEAD = "action_head"  # depends on the noisy actions or the timestep


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one linear becomes integer."""

    w_bits: int  # 8: int8 per output channel; 4: int4 per group, two per byte
    a_bits: int  # 8 or 4, symmetric
    group_size: int = 128  # int4 weights only; -1 = one group per output channel
    act_mode: str = "dynamic"  # "dynamic" per token at run time; "static" per tensor or "per_step" per flow step,
    # both from calibration
    weight_clip: str = "absmax"  # or "mse": grid search of the clipping ratio per output channel


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    """Everything decided about one aten.linear node."""

    module_path: str
    in_features: int
    out_features: int
    role: Role = Role.OTHER
    block: int = -1  # index of its attention core / MLP block in graph order, -1 for OTHER
    heads: int | None = None  # query heads (attention linears)
    head_dim: int | None = None
    mlp_part: str | None = None  # "up" (gate/up, fc1) or "down" (down, fc2)
    region: Region | None = None
    spec: QuantSpec | None = None  # None = stays float
    out_scale: tuple[float, ...] | None = None  # per-output-channel factor folded into the dequant scale (ATM/OHB)
    rotation: str | None = None  # transforms on its input, e.g. "smoothquant", "hadamard", "smoothquant+duquant"

    @property
    def is_quantized(self) -> bool:
        return self.spec is not None

    @property
    def bits_label(self) -> str:
        return f"W{self.spec.w_bits}A{self.spec.a_bits}" if self.spec else "float"


def info(node: fx.Node) -> LinearInfo | None:
    return node.meta.get(QVLA_META)


def annotate(node: fx.Node, value: LinearInfo) -> None:
    node.meta[QVLA_META] = value


def update(node: fx.Node, **changes) -> LinearInfo:
    new = dataclasses.replace(node.meta[QVLA_META], **changes)
    node.meta[QVLA_META] = new
    return new
