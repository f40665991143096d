"""QuantPlan: what calibration decided, as data — calibrate once, compile many times.

A plan holds, per module path (e.g. `language_model.layers.0.mlp.up_proj`; stable across re-export because it is the
nn.Module path, never an FX node name): the region, role and QuantSpec (None = stays float), the integer weight and
its scales, the static activation scale (per graph), and optional extra tensors and JSON that other passes attach
(rotations, ATM α / OHB β, ...). On disk it is a folder:

    plan/plan.json            format, model, recipe, and one JSON object per module path
    plan/tensors.safetensors  "<module path>::<tensor name>" → tensor

Nothing is pickled. `quantize(..., plan=...)` and the `qvla` torch.compile backend both consume it.

Example::

    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe="w4a8")
    plan = QuantPlan.from_program(qp, policy)   # or: qvla calibrate --model pi05-tiny --recipe w4a8 --out plan/
    plan.save("plan/")
    qp2 = qvla_compiler.quantize(policy, policy.example_inputs(), plan=QuantPlan.load("plan/"))  # no calibration
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qvla_compiler.errors import QvlaError
from qvla_compiler.meta import QVLA_META, LinearInfo, QuantSpec

PLAN_FORMAT = 1
PLAN_JSON, PLAN_TENSORS = "plan.json", "tensors.safetensors"
_SEP = "::"
# The tensors quantize_linears produces; "act_scale@<graph>" holds a static activation scale per graph.
WEIGHT_Q, WEIGHT_SCALE, ACT_SCALE = "weight_q", "weight_scale", "act_scale"


class PlanError(QvlaError, ValueError):
    """A plan is unreadable, or does not fit the model or graph it is applied to."""


@dataclasses.dataclass
class ModulePlan:
    """Everything decided for one linear, keyed by its module path."""

    module_path: str
    region: str
    role: str
    in_features: int
    out_features: int
    spec: QuantSpec | None  # None: the linear stays float
    graphs: tuple[str, ...] = ()  # graphs of the program that read it ("prefix", "denoise", "forward")
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON: sqnr_db, fingerprint, out_scale, ...

    @property
    def is_quantized(self) -> bool:
        return self.spec is not None

    def act_scale(self, graph: str | None = None) -> torch.Tensor | None:
        """Static activation scale for `graph` (any graph's when None: the backend has no graph names)."""
        if graph is not None and f"{ACT_SCALE}@{graph}" in self.tensors:
            return self.tensors[f"{ACT_SCALE}@{graph}"]
        return next((t for k, t in self.tensors.items() if k.startswith(ACT_SCALE + "@")), None)

    def to_json(self) -> dict:
        spec = dataclasses.asdict(self.spec) if self.spec is not None else None
        return {"region": self.region, "role": self.role, "in_features": self.in_features,
                "out_features": self.out_features, "spec": spec, "graphs": list(self.graphs),
                "tensors": sorted(self.tensors), "extra": self.extra}


@dataclasses.dataclass
class QuantPlan:
    model: str
    recipe: dict  # dataclasses.asdict(QuantRecipe)
    modules: dict[str, ModulePlan]
    format: int = PLAN_FORMAT

    def __getitem__(self, path: str) -> ModulePlan:
        return self.modules[path]

    @property
    def quantized(self) -> list[ModulePlan]:
        return [m for m in self.modules.values() if m.is_quantized]

    def recipe_object(self):
        """The QuantRecipe the plan was calibrated with (the registered preset when it is unchanged)."""
        from qvla_compiler.recipes import RECIPES, QuantRecipe

        preset = RECIPES.get(self.recipe.get("name"))
        if preset is not None and json.loads(json.dumps(dataclasses.asdict(preset), default=str)) == self.recipe:
            return preset
        known = {f.name for f in dataclasses.fields(QuantRecipe)}
        fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                  for k, v in self.recipe.items() if k in known}
        return QuantRecipe(**fields)

    def require_replayable(self) -> None:
        """Plans carry linears' integer form only: rotations, smoothing and ATM/OHB change other tensors and ops
        (online rotations, norm gains, folded α/β), which a plan cannot replay yet."""
        r = self.recipe
        used = [k for k, off in (("rotation", "none"), ("smooth", "none")) if r.get(k, off) != off]
        used += [k for k in ("atm", "ohb") if r.get(k)]
        if used:
            raise PlanError(f"this plan was calibrated with {', '.join(used)}, which a QuantPlan cannot replay yet "
                            "(only layout, integer weights and scales); quantize with the recipe directly")

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_program(cls, qp, model: torch.nn.Module | None = None) -> "QuantPlan":
        """Read the decisions and integer tensors out of a QuantizedProgram. With `model`, each entry also
        records a fingerprint of the float weight, so applying the plan to other weights fails loudly."""
        sqnr = {(r.graph, r.module_path): r.sqnr_db for r in qp.report.linears}
        modules: dict[str, ModulePlan] = {}
        for graph, gm in qp.program.graphs.items():
            for node in gm.graph.nodes:
                info = node.meta.get(QVLA_META)
                if node.op != "call_function" or not isinstance(info, LinearInfo):
                    continue
                entry = modules.get(info.module_path)
                if entry is None:
                    entry = modules[info.module_path] = _entry(info, sqnr.get((graph, info.module_path)), model)
                if graph not in entry.graphs:
                    entry.graphs = (*entry.graphs, graph)
                _collect_tensors(entry, gm, node, graph)
        recipe = json.loads(json.dumps(dataclasses.asdict(qp.recipe), default=str))
        return cls(qp.report.model, recipe, modules)

    # ---------------------------------------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write plan.json and tensors.safetensors into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{path}{_SEP}{name}": t.detach().contiguous().cpu()
                   for path, m in self.modules.items() for name, t in m.tensors.items()}
        save_file(tensors, str(directory / PLAN_TENSORS), metadata={"format": str(self.format)})
        doc = {"format": self.format, "model": self.model, "recipe": self.recipe,
               "modules": {path: m.to_json() for path, m in self.modules.items()}}
        (directory / PLAN_JSON).write_text(json.dumps(doc, indent=1, default=_json_default))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        """Read a plan folder (or its plan.json). Reads JSON and safetensors only."""
        path = Path(path)
        directory = path.parent if path.name == PLAN_JSON else path
        if not (directory / PLAN_JSON).is_file():
            raise PlanError(f"no plan at {directory} (expected {PLAN_JSON} and {PLAN_TENSORS}); write one with "
                            f"`qvla calibrate --model ... --recipe ... --out {directory}`")
        doc = _read_json(directory / PLAN_JSON)
        if doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{directory} has plan format {doc.get('format')}; this qvla_compiler reads "
                            f"{PLAN_FORMAT}. Re-run `qvla calibrate`.")
        flat = _read_tensors(directory / PLAN_TENSORS)
        try:
            modules = {mpath: _module_from_json(mpath, m, flat, directory) for mpath, m in doc["modules"].items()}
            return cls(doc["model"], doc["recipe"], modules, doc["format"])
        except PlanError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise PlanError(f"{directory / PLAN_JSON} is not a valid plan ({type(exc).__name__}: {exc}); "
                            "re-run `qvla calibrate`") from exc


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON ({exc}); the plan is corrupt — re-run `qvla calibrate`") from exc
    if not isinstance(doc, dict):
        raise PlanError(f"{path} holds a JSON {type(doc).__name__}, not a plan object; re-run `qvla calibrate`")
    return doc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own (SafetensorError) and OSError types
        raise PlanError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); the plan is "
                        "corrupt or truncated — re-run `qvla calibrate`") from exc


def _module_from_json(mpath: str, m: dict, flat: dict, directory: Path) -> ModulePlan:
    missing = [n for n in m["tensors"] if f"{mpath}{_SEP}{n}" not in flat]
    if missing:
        raise PlanError(f"{directory / PLAN_TENSORS} lacks {missing} of module {mpath}; the plan is "
                        "incomplete — re-run `qvla calibrate`")
    return ModulePlan(mpath, m["region"], m["role"], m["in_features"], m["out_features"],
                      QuantSpec(**m["spec"]) if m["spec"] is not None else None, tuple(m["graphs"]),
                      {n: flat[f"{mpath}{_SEP}{n}"] for n in m["tensors"]}, m.get("extra", {}))


def as_plan(plan: "QuantPlan | str | os.PathLike") -> QuantPlan:
    """A QuantPlan object, or one loaded from a folder path."""
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return QuantPlan.load(plan)
    raise PlanError(f"a plan must be a QuantPlan or a path to a plan folder, got {type(plan).__name__}")


def weight_fingerprint(w: torch.Tensor) -> list[float]:
    """[sum, sum of squares] in float64: cheap, order-stable identity check for a float weight."""
    w = w.detach().double()
    return [float(w.sum()), float((w * w).sum())]


def check_fingerprint(entry: ModulePlan, w: torch.Tensor, where: str) -> None:
    if tuple(w.shape) != (entry.out_features, entry.in_features):
        raise PlanError(f"{where}: the plan's {entry.module_path} is [{entry.out_features}, {entry.in_features}] "
                        f"but the model's weight is {list(w.shape)}: the plan was made for another model")
    want = entry.extra.get("fingerprint")
    if want is None:
        return
    got = weight_fingerprint(w)
    if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(got, want)):
        raise PlanError(f"{where}: {entry.module_path}'s weights differ from the ones the plan was calibrated "
                        f"on (fingerprint {got} vs {want}); re-run `qvla calibrate` on this checkpoint")


def _entry(info: LinearInfo, sqnr, model) -> ModulePlan:
    extra: dict[str, Any] = {"block": info.block, "heads": info.heads, "head_dim": info.head_dim,
                             "mlp_part": info.mlp_part, "sqnr_db": sqnr}
    if info.out_scale is not None:
        extra["out_scale"] = list(info.out_scale)
    if model is not None:
        try:
            extra["fingerprint"] = weight_fingerprint(model.get_parameter(info.module_path + ".weight"))
        except AttributeError:
            pass
    return ModulePlan(info.module_path, info.region.value if info.region else "backbone", info.role.value,
                      info.in_features, info.out_features, info.spec, (), {}, extra)


def _collect_tensors(entry: ModulePlan, gm, node, graph: str) -> None:
    names = node.meta.get("qvla_tensors")
    if names is None:
        return
    entry.tensors.setdefault(WEIGHT_Q, getattr(gm, names.weight).detach().clone())
    entry.tensors.setdefault(WEIGHT_SCALE, getattr(gm, names.weight_scale).detach().clone())
    if names.act_scale:
        entry.tensors[f"{ACT_SCALE}@{graph}"] = getattr(gm, names.act_scale).detach().clone()


def _json_default(value):
    if isinstance(value, float):
        return str(value)  # inf / nan
    raise TypeError(type(value))
