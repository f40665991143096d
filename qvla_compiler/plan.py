"""QuantPlan: what calibration decided, as data — calibrate once, compile many times.

Every program is built by applying a plan (pipeline.apply); calibration (pipeline.calibrate) is what makes one. A plan
holds, per module path (e.g. `language_model.layers.0.mlp.up_proj`; stable across re-export because it is the
nn.Module path, never an FX node name): the region, role, QuantSpec (None = stays float, with the reason when the
layout wanted it integer), the rotation label of its input, the integer weight and its scales, the static activation
scale (per graph), the fitted tensors of its input group's transforms (on the group's first linear: SmoothQuant s,
DuQuant Λ, R₁, P, R₂) and a fingerprint of the float weight it was computed from; and, for the whole program, the
ATM/OHB record (α per action-head attention head, β per layer, with the statistics they came from) and, for
act_mode "per_step", the flow-time bounds of the steps its activation-scale tables are indexed by. On disk:

    plan/plan.json            format, model, recipe, and one JSON object per module path
    plan/tensors.safetensors  "<module path>::<tensor name>" → tensor

Nothing is pickled. `quantize(..., plan=...)` and the `qvla` torch.compile backend both consume it.

Example::

    plan = qvla_compiler.calibrate(policy, policy.example_inputs(), recipe="quantvla-w4a8")
    plan.save("plan/")   # or: qvla calibrate --model pi05-tiny --recipe quantvla-w4a8 --out plan/
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), plan=QuantPlan.load("plan/"))  # no calibration
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
from qvla_compiler.meta import QuantSpec
from qvla_compiler.quant.released import is_released

PLAN_FORMAT = 2  # 1: linears only (no rotations, smoothing or ATM/OHB); refused
PLAN_JSON, PLAN_TENSORS = "plan.json", "tensors.safetensors"
_SEP = "::"
# The tensors quantize_linears produces; "act_scale@<graph>[#k]" holds the static activation scale of the k-th call
# site (k > 0 only for a weight read more than once, e.g. a shared head) in one graph.
WEIGHT_Q, WEIGHT_SCALE, ACT_SCALE = "weight_q", "weight_scale", "act_scale"
# A group's fitted transforms, on its first linear's entry.
SMOOTH, DUQUANT = "smooth", ("duquant_smooth", "duquant_rot1", "duquant_perm", "duquant_rot2")


def act_scale_key(graph: str, site: int = 0) -> str:
    return f"{ACT_SCALE}@{graph}" + (f"#{site}" if site else "")


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
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON: sqnr_db, fingerprint, rotation, ...

    @property
    def is_quantized(self) -> bool:
        return self.spec is not None

    def act_scale(self, graph: str | None = None, site: int = 0) -> torch.Tensor | None:
        """Static activation scale of call site `site` in `graph` (when the plan has no such graph — the backend's
        graphs have no names — the first graph's scale of that call site)."""
        if graph is not None and act_scale_key(graph, site) in self.tensors:
            return self.tensors[act_scale_key(graph, site)]
        suffix = f"#{site}" if site else ""
        return next((t for k, t in self.tensors.items() if k.startswith(ACT_SCALE + "@")
                     and (k.endswith(suffix) if site else "#" not in k)), None)

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
    attention: dict | None = None  # calibration.match_attention_scales' record: α/β per graph and block
    format: int = PLAN_FORMAT
    step_bounds: list[float] | None = None  # act_mode per_step: the flow-step buckets (quant/step_scales.py)

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

    # ---------------------------------------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write plan.json and tensors.safetensors into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{path}{_SEP}{name}": t.detach().contiguous().cpu()
                   for path, m in self.modules.items() for name, t in m.tensors.items()}
        save_file(tensors, str(directory / PLAN_TENSORS), metadata={"format": str(self.format)})
        doc = {"format": self.format, "model": self.model, "recipe": self.recipe, "attention": self.attention,
               "step_bounds": self.step_bounds, "modules": {path: m.to_json() for path, m in self.modules.items()}}
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
                            f"{PLAN_FORMAT} (format 1 plans carried no rotations, smoothing or ATM/OHB and cannot be "
                            f"replayed exactly). Re-run `qvla calibrate ... --out {directory}`.")
        flat = _read_tensors(directory / PLAN_TENSORS)
        try:
            modules = {mpath: _module_from_json(mpath, m, flat, directory) for mpath, m in doc["modules"].items()}
            return cls(doc["model"], doc["recipe"], modules, doc.get("attention"), doc["format"],
                       doc.get("step_bounds"))
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
    if want is None or is_released(w):  # released by this very compile (consume), after its fingerprint was taken
        return
    got = weight_fingerprint(w)
    if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(got, want)):
        raise PlanError(f"{where}: {entry.module_path}'s weights differ from the ones the plan was calibrated "
                        f"on (fingerprint {got} vs {want}); re-run `qvla calibrate` on this checkpoint")


def _json_default(value):
    if isinstance(value, float):
        return str(value)  # inf / nan
    raise TypeError(type(value))
