"""What quantization did, in numbers: per-linear bits, bytes and SQNR; totals; action fidelity."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable

import torch
import torch.fx as fx

from qvla_compiler.errors import ShapeError
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import KEPT_FLOAT, SITE_SQNR, _fetch
from qvla_compiler.quant.quantizers import SCALE_DTYPES, sqnr_db
from qvla_compiler.quant.released import storage_key

BF16 = 2


@dataclasses.dataclass(frozen=True)
class LinearReport:
    graph: str
    module_path: str
    region: str
    role: str
    bits: str
    params: int
    bytes_bf16: int
    bytes_quant: int
    sqnr_db: float | None
    reason: str | None = None  # why a linear the layout made integer stayed float
    call_site: int = 0  # k > 0: the k-th further reader of a weight in this graph; its bytes are counted at 0


@dataclasses.dataclass(frozen=True)
class Report:
    model: str
    recipe: str
    layout: str
    linears: tuple[LinearReport, ...]
    policy_bytes_bf16: int
    policy_bytes_quant: int
    action_rel_l2: float | None = None
    action_sqnr_db: float | None = None
    attention_scales: dict | None = None  # ATM α / OHB β per graph and attention block, with their statistics
    warnings: tuple[str, ...] = ()  # what the user should know even though nothing failed (see collect_warnings)
    hoisted: tuple[str, ...] = ()  # denoise-step values computed once per sample in the prefix (hoist_invariants,
    # and table_time_values: "… per timestep")

    @property
    def int_linears(self) -> int:
        return sum(r.bits != "float" for r in self.linears)

    @property
    def float_linears(self) -> int:
        return sum(r.bits == "float" for r in self.linears)

    @property
    def bytes_bf16(self) -> int:
        """bf16 bytes of the components that were quantized."""
        return sum(r.bytes_bf16 for r in self.linears if r.bits != "float")

    @property
    def bytes_quant(self) -> int:
        return sum(r.bytes_quant for r in self.linears if r.bits != "float")

    @property
    def memory_saving(self) -> float:
        return 1 - self.bytes_quant / self.bytes_bf16 if self.bytes_bf16 else 0.0

    @property
    def policy_memory_saving(self) -> float:
        return 1 - self.policy_bytes_quant / self.policy_bytes_bf16 if self.policy_bytes_bf16 else 0.0

    def by_region(self) -> dict[str, dict]:
        """Per region: how many linears are integer and float, and the integer ones per format ("W4A8": 14)."""
        out: dict[str, dict] = {}
        for r in self.linears:
            row = out.setdefault(r.region, {"int": 0, "float": 0, "formats": {}})
            row["float" if r.bits == "float" else "int"] += 1
            if r.bits != "float":
                row["formats"][r.bits] = row["formats"].get(r.bits, 0) + 1
        return out

    def summary(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "layout": self.layout,
                "int_linears": self.int_linears, "float_linears": self.float_linears,
                "bytes_bf16": self.bytes_bf16, "bytes_quant": self.bytes_quant,
                "memory_saving": round(self.memory_saving, 4),
                "policy_bytes_bf16": self.policy_bytes_bf16, "policy_bytes_quant": self.policy_bytes_quant,
                "policy_memory_saving": round(self.policy_memory_saving, 4),
                "action_rel_l2": self.action_rel_l2, "action_sqnr_db": self.action_sqnr_db,
                "regions": self.by_region(), "warnings": list(self.warnings), "hoisted": list(self.hoisted)}

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "linears": [dataclasses.asdict(r) for r in self.linears],
                           "attention_scales": self.attention_scales}, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(LinearReport)}  # older JSON lacks the newer fields
        linears = tuple(LinearReport(**{k: v for k, v in r.items() if k in fields}) for r in data["linears"])
        keys = ("model", "recipe", "layout", "policy_bytes_bf16", "policy_bytes_quant", "action_rel_l2",
                "action_sqnr_db")
        return cls(linears=linears, attention_scales=data.get("attention_scales"),
                   warnings=tuple(data.get("warnings", ())), hoisted=tuple(data.get("hoisted", ())),
                   **{k: data[k] for k in keys})


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(type(value))


def quant_bytes(info, k: int, n: int, has_bias: bool) -> int:
    """Bytes of one linear's integer form: weights, scales (quantizers.SCALE_DTYPES), bf16 bias."""
    spec = info.spec
    scale_bytes = SCALE_DTYPES[spec.w_bits].itemsize
    if spec.w_bits == 8:
        weight, scales = n * k, scale_bytes * n
    else:  # int4: two per byte; 2 and 3 bits: `bits` bit-planes of ceil(K/8) bytes (kernels/ops.py)
        gs = k if spec.group_size <= 0 else spec.group_size
        row = (k + 1) // 2 if spec.w_bits == 4 else spec.w_bits * math.ceil(k / 8)
        weight, scales = n * row, scale_bytes * n * math.ceil(k / gs)
    return weight + scales + (BF16 * n if has_bias else 0)


def linear_reports(name: str, gm: fx.GraphModule) -> list[LinearReport]:
    """Per-linear rows for one graph; integer rows carry the SQNR quantize_linears measured.
    Every call site gets a row; a weight read by several call sites has its bytes counted on the first one."""
    rows, readers = [], {}
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        bias = node.args[2] if len(node.args) > 2 else None
        params = info.in_features * info.out_features + (info.out_features if bias is not None else 0)
        quant, sqnr = BF16 * params, None
        if info.is_quantized:
            quant = quant_bytes(info, info.in_features, info.out_features, bias is not None)
            sqnr = node.meta.get(SITE_SQNR)  # measured by quantize_linears, while the float weight existed
        site = readers.setdefault(_weight_identity(node), [])
        site.append(node)
        kept = node.meta.get(KEPT_FLOAT)
        bf16, quant = (BF16 * params, quant) if len(site) == 1 else (0, 0)
        rows.append(LinearReport(name, info.module_path, info.region.value, info.role.value, info.bits_label,
                                 params, bf16, quant, sqnr, kept.reason if kept else None, len(site) - 1))
    return rows


def planned_sqnr(row: LinearReport, plan) -> LinearReport:
    """The row with the SQNR its linear had on its calibration sample (a plan's program has no samples of its own)."""
    sqnr = plan.modules[row.module_path].extra.get("sqnr_db", {}).get(row.graph) if row.bits != "float" else None
    return dataclasses.replace(row, sqnr_db=sqnr)


def _weight_identity(node: fx.Node) -> str:
    tensors, w = node.meta.get("qvla_tensors"), node.args[1]
    if tensors is not None:
        return tensors.weight
    return w.target if w.op == "get_attr" else w.name


def output_fidelity(ref, out) -> tuple[float, float]:
    """(rel-L2, SQNR dB) of `out` against `ref` over every tensor leaf of the two pytrees (tuples, dicts, nested):
    the leaves are flattened and concatenated, so large outputs weigh in proportion to their size."""
    ref_leaves, spec = torch.utils._pytree.tree_flatten(ref)
    out_leaves, out_spec = torch.utils._pytree.tree_flatten(out)
    if spec != out_spec:
        raise ShapeError(f"the quantized program returns {out_spec} but the float module returns {spec}; a pass "
                         "changed the output structure: report this as a bug")
    pairs = [(r, o) for r, o in zip(ref_leaves, out_leaves) if isinstance(r, torch.Tensor)]
    if not pairs:
        return 0.0, math.inf
    r = torch.cat([a.detach().double().reshape(-1) for a, _ in pairs])
    o = torch.cat([b.detach().double().reshape(-1) for _, b in pairs])
    rel = float((o - r).norm() / r.norm().clamp_min(1e-12))
    return rel, sqnr_db(r, o)


def collect_warnings(rows, layout: str, is_policy: bool, captured: Iterable[str] = ()) -> tuple[str, ...]:
    """What a user must not miss although nothing failed: what capture warned about (products with a parameter left
    float, linears in a torch.cond), a layout that made nothing integer, a graph whose linears all got role 'other',
    linears kept float for a reason, a policy whose linears all share one region."""
    out = list(dict.fromkeys(captured))
    out += [] if rows else ["no linear layer was found (aten.linear, or addmm / mm / matmul / bmm / einsum with a "
                           "weight made from parameters): nothing was quantized, the program is the float model"]
    ints = sum(r.bits != "float" for r in rows)
    if rows and ints == 0 and layout != "none":
        out.append(f"layout {layout!r} quantized 0 of {len(rows)} linears: nothing became integer; check the "
                   "regions and roles in the report rows, or try layout='all'")
    for graph in dict.fromkeys(r.graph for r in rows):
        roles = {r.role for r in rows if r.graph == graph}
        if roles == {"other"} and layout != "all":  # under 'all' roles decide nothing
            out.append(f"graph {graph!r} has linears but no attention or MLP block was recognised, so every one "
                       "is role 'other' (float under the quantvla/strict layouts); name them with "
                       "QuantRecipe(role_overrides=...) or use layout='all'")
    kept = [r for r in rows if r.reason]
    if kept:
        out.append(f"{len(kept)} linear(s) kept float although the layout made them integer: "
                   + "; ".join(f"{r.graph}:{r.module_path}: {r.reason}" for r in kept))
    regions = {r.region for r in rows}
    if is_policy and len(regions) == 1:
        out.append(f"every linear of the policy was assigned to region {next(iter(regions))!r}; region "
                   "assignment found no vision/backbone/action-head split (check the captured inputs' roles) — "
                   "set QuantRecipe(region_overrides=...) if this is wrong")
    return tuple(out)


def param_bytes(graphs) -> int:
    """bf16 bytes of every floating tensor the graphs read, each tensor counted once across graphs."""
    seen: dict[int, int] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                t = _fetch(gm, node)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen[storage_key(t)] = BF16 * t.numel()
    return sum(seen.values())
