"""Recipes: what to quantize (a layout) and how (bits, granularity, activation mode). Frozen data, presets in dicts."""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from qvla_compiler.errors import RecipeError
from qvla_compiler.kernels.ops import WEIGHT_BITS
from qvla_compiler.meta import QuantSpec, Region, Role

_ATTN = frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.ATTN_QKV, Role.ATTN_KV})
_BLOCK = _ATTN | {Role.MLP}
_UNIFORM = frozenset({(region, r) for region in (Region.BACKBONE, Region.ACTION_HEAD) for r in _BLOCK})

# How activation scales are set: per token at run time; one static scale per call site from calibration; or one
# static scale per flow step of the action head, picked from the step's time at run time (quant/step_scales.py), with
# the graphs that see no flow time (the prefix) per token at run time.
ACT_MODES = ("dynamic", "static", "per_step")
# A layout is the set of (region, role) pairs that become integer; everything else stays float.
LAYOUTS: Mapping[str, frozenset[tuple[Region, Role]]] = {
    # QuantVLA: every language-backbone linear and the action head's MLPs; action-head attention, the vision
    # tower and the small conditioning/projection linears stay float (the paper's 180 / 116 layers).
    "quantvla": frozenset({(Region.BACKBONE, r) for r in _BLOCK} | {(Region.ACTION_HEAD, Role.MLP)}),
    # Conservative: only MLPs (backbone and action head); every attention projection float.
    "strict": frozenset({(Region.BACKBONE, Role.MLP), (Region.ACTION_HEAD, Role.MLP)}),
    # Ω-QVLA's uniform layout: every transformer-block linear of the language backbone and of the action head,
    # attention included; the vision tower and the small conditioning/projection linears (Role.OTHER) stay float.
    "uniform": _UNIFORM,
    # Action-guided mixed precision: the uniform layout's linears, each with the weight width calibration allocated
    # under the recipe's bits-per-weight budget (QuantRecipe.bpw → weight_bits; quant/mixed_precision.py).
    "auto": _UNIFORM,
    # The naive baseline: every linear in the graph, whatever it is.
    "all": frozenset({(region, role) for region in Region for role in Role}),
    "none": frozenset(),
}


ROTATIONS = ("none", "hadamard", "duquant", "svd-hadamard", "quarot")
SMOOTHINGS = ("none", "smoothquant", "awq")
WEIGHT_METHODS = ("rtn", "gptq")
TUNE_STEPS = 64  # recipe option "+tune": steps of weight-scale tuning (tuning.py; RESULTS §18)
SENSITIVITIES = ("measured", "gradient")  # layout "auto": how each linear's action error per width is found
FLOAT_DTYPES = ("fp32", "bf16")  # what the linears the layout keeps float run in (bf16: only fast with native bf16)


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """One quantization recipe. `region_overrides` / `role_overrides` map module-path prefixes to a forced
    region or role (the only place module names are used); `skip` lists module-path prefixes kept float."""

    name: str
    layout: str = "quantvla"
    w_bits: int = 8
    a_bits: int = 8
    backbone_a_bits: int | None = None  # the backbone's integer linears quantize activations to this width instead
    group_size: int = 128
    act_mode: str = "dynamic"
    weight_clip: str = "absmax"
    weight_method: str = "rtn"  # "rtn": round to nearest; "gptq": error-compensating rounding on the input Hessian
    region_overrides: tuple[tuple[str, Region], ...] = ()
    role_overrides: tuple[tuple[str, Role], ...] = ()
    skip: tuple[str, ...] = ()
    rotation: str = "none"  # "none" | "hadamard" | "duquant" | "svd-hadamard" per quantized input, or "quarot": the
    # RMSNorm residual stream rotated and folded into the weights, "hadamard" on the other inputs; all exact in float
    # (passes/rotate_*)
    smooth: str = "none"  # "none" | "smoothquant" | "awq" (scales searched for 4-bit weights): folded into the norm
    smooth_alpha: float = 0.5  # migration strength of SmoothQuant and of DuQuant's / SVD·Hadamard's own smoothing
    rotation_block: int = 128  # DuQuant / SVD·Hadamard block size (the largest fitting divisor of the width <= this)
    atm: bool = False  # Attention Temperature Matching: per action-head attention head α folded into q_proj
    ohb: bool = False  # Output Head Balancing: per action-head attention layer β folded into o_proj
    atm_style: str = "auto"  # "pi05" clip [0.8, 1.25], |α-1| <= 0.05; "groot" [0.7, 1.4], < 0.02; "auto": by policy
    atm_clip: tuple[float, float] | None = None  # overrides the style's clip range
    atm_neutral: float | None = None  # overrides the style's neutral band
    ohb_log_clip: float = 0.3  # |log β| <= this
    ohb_neutral: float = 0.03  # β = 1 when |log β| < this
    float_dtype: str = "fp32"  # "bf16": the float linears stored and run in bf16 (lowering.cast_float_linears)
    bpw: float | None = None  # layout "auto": average weight bits over the candidate linears (>= 2; 16 = float)
    weight_bits: tuple[tuple[str, int], ...] = ()  # module path → weight width (2, 3, 4, 8; 16 = float), by "auto"
    tune_steps: int = 0  # > 0: after rounding, this many steps of action-aware weight-scale tuning (tuning.py)
    sensitivity: str = "measured"  # layout "auto": "measured" (a sampler run per linear and width) or "gradient" (to
    # first order from backward passes: 2-5x faster compiles; calibration.estimate_weight_sensitivity, RESULTS §20)

    def __post_init__(self):
        _require(self.layout in LAYOUTS, f"unknown layout {self.layout!r}; choose one of {sorted(LAYOUTS)}")
        _require(self.w_bits in WEIGHT_BITS, f"w_bits must be one of {WEIGHT_BITS}, got {self.w_bits}")
        _require(self.a_bits in (4, 8), f"a_bits must be 4 or 8, got {self.a_bits}")
        _require(self.backbone_a_bits in (None, 4, 8), f"backbone_a_bits must be 4 or 8, got {self.backbone_a_bits}")
        _require(self.group_size == -1 or self.group_size >= 2 and self.group_size % 2 == 0,
                 f"group_size must be -1 (per channel) or an even number >= 2, got {self.group_size}")
        _require(self.act_mode in ACT_MODES, f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        _require(self.weight_clip in ("absmax", "mse"), f"weight_clip must be 'absmax' or 'mse', got {self.weight_clip!r}")
        _require(self.sensitivity in SENSITIVITIES,
                 f"sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
        _require(self.weight_method in WEIGHT_METHODS,
                 f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        _require(self.rotation in ROTATIONS, f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        _require(self.smooth in SMOOTHINGS, f"smooth must be one of {SMOOTHINGS}, got {self.smooth!r}")
        _require(0.0 <= self.smooth_alpha <= 1.0, f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        _require(self.rotation_block >= 2, f"rotation_block must be >= 2, got {self.rotation_block}")
        _require(self.atm_style in ("auto", "pi05", "groot"), f"atm_style must be auto/pi05/groot, got {self.atm_style!r}")
        _require(self.atm_clip is None or len(self.atm_clip) == 2 and 0 < self.atm_clip[0] <= 1 <= self.atm_clip[1],
                 f"atm_clip must be (lo, hi) with 0 < lo <= 1 <= hi, got {self.atm_clip}")
        _require(self.atm_neutral is None or 0 <= self.atm_neutral < 1, f"atm_neutral must be in [0, 1), got {self.atm_neutral}")
        _require(0 <= self.ohb_log_clip <= 2, f"ohb_log_clip must be in [0, 2], got {self.ohb_log_clip}")
        _require(0 <= self.ohb_neutral <= self.ohb_log_clip or self.ohb_log_clip == 0,
                 f"ohb_neutral must be in [0, ohb_log_clip], got {self.ohb_neutral}")
        _require(self.layout != "auto" or self.weight_bits or self.bpw is not None,
                 "layout 'auto' allocates weight bits under a budget: give bpw (e.g. --bpw 4.5)")
        _require(self.bpw is None or min(WEIGHT_BITS) <= self.bpw <= 16,
                 f"bpw must be in [{min(WEIGHT_BITS)}, 16] (the integer weights have {WEIGHT_BITS} bits; 16 = "
                 f"float), got {self.bpw}")
        _require(all(w in (*WEIGHT_BITS, 16) for _, w in self.weight_bits),
                 f"weight_bits widths must be in {(*WEIGHT_BITS, 16)}, got {sorted({w for _, w in self.weight_bits})}")
        _require(self.tune_steps >= 0, f"tune_steps must be >= 0, got {self.tune_steps}")
        _require(self.float_dtype in FLOAT_DTYPES,
                 f"float_dtype must be one of {FLOAT_DTYPES}, got {self.float_dtype!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, self.a_bits, self.group_size, self.act_mode, self.weight_clip)

    def spec_for(self, module_path: str, region: Region | None = None) -> QuantSpec | None:
        """The spec of one linear the layout makes integer: weight_bits may narrow or widen it, or keep it float;
        backbone_a_bits sets the activation width of the backbone's."""
        width = dict(self.weight_bits).get(module_path, self.w_bits)
        a_bits = self.backbone_a_bits if region == Region.BACKBONE and self.backbone_a_bits else self.a_bits
        return None if width == 16 else dataclasses.replace(self.spec, w_bits=width, a_bits=a_bits)

    @property
    def needs_bit_allocation(self) -> bool:
        return self.layout == "auto" and not self.weight_bits

    def integer_pairs(self) -> frozenset[tuple[Region, Role]]:
        return LAYOUTS[self.layout]

    def with_(self, **changes) -> "QuantRecipe":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(f"invalid recipe: {message}")


RECIPES: Mapping[str, QuantRecipe] = {
    "w8a8": QuantRecipe("w8a8", w_bits=8, a_bits=8),
    "w4a8": QuantRecipe("w4a8", w_bits=4, a_bits=8, group_size=128),
    "w4a4": QuantRecipe("w4a4", w_bits=4, a_bits=4, group_size=128),
    "w8a8-static": QuantRecipe("w8a8-static", w_bits=8, a_bits=8, act_mode="static"),
    "w8a8-perstep": QuantRecipe("w8a8-perstep", w_bits=8, a_bits=8, act_mode="per_step"),
    "w4a8-mse": QuantRecipe("w4a8-mse", w_bits=4, a_bits=8, weight_clip="mse"),
    # 3-bit weights (7 levels, bf16 group scales: 3.125 bits a weight), with error compensation and without
    "w3a8": QuantRecipe("w3a8", w_bits=3, a_bits=8),
    "w3a8-gptq": QuantRecipe("w3a8-gptq", w_bits=3, a_bits=8, weight_method="gptq"),
    "w4a8-gptq": QuantRecipe("w4a8-gptq", w_bits=4, a_bits=8, weight_method="gptq"),
    "w4a4-gptq": QuantRecipe("w4a4-gptq", w_bits=4, a_bits=4, weight_method="gptq"),
}
RECIPES = {**RECIPES, **{f"quantvla-{k}": dataclasses.replace(v, name=f"quantvla-{k}") for k, v in RECIPES.items()
                         if k in ("w8a8", "w4a8", "w4a4")}}
# QuantVLA proper: the selective layout with DuQuant (smoothing + block rotation + zigzag + rotation, §9) per input.
RECIPES["quantvla-w4a8"] = QuantRecipe("quantvla-w4a8", w_bits=4, a_bits=8, rotation="duquant", smooth_alpha=0.6,
                                       atm=True, ohb=True)
RECIPES["quantvla-w4a4"] = QuantRecipe("quantvla-w4a4", w_bits=4, a_bits=4, rotation="duquant", smooth_alpha=0.6,
                                       atm=True, ohb=True)

# Ω-QVLA-style uniform W4A4: every block linear of backbone and action head integer (attention included), the composite
# SVD·Hadamard rotation on every input and GPTQ weights. Activations stay per token: per-step static scales
# ("+per_step") came within 1-2 points of them in closed loop, not above, on held-out episodes (RESULTS §16).
RECIPES["omega-w4a4"] = QuantRecipe("omega-w4a4", layout="uniform", w_bits=4, a_bits=4, rotation="svd-hadamard",
                                    weight_method="gptq")

# "preset+option+...": each option changes one field (e.g. "quantvla-w4a8+gptq", "w4a4+uniform+svd-hadamard").
OPTIONS: Mapping[str, dict] = {
    **{lay: dict(layout=lay) for lay in LAYOUTS if lay not in ("auto", "none")},  # auto needs a bpw: --layout/--bpw
    **{m: dict(weight_method=m) for m in WEIGHT_METHODS},
    "mse": dict(weight_clip="mse"),
    **{s: dict(smooth=s) for s in SMOOTHINGS if s != "none"},
    **{r: dict(rotation=r) for r in ROTATIONS if r != "none"},
    **{m: dict(act_mode=m) for m in ACT_MODES},
    "atm": dict(atm=True), "ohb": dict(ohb=True), "bf16": dict(float_dtype="bf16"),
    "tune": dict(tune_steps=TUNE_STEPS),
    # W4A4 loses most of its closed-loop points in the backbone's 4-bit activations (RESULTS §21), which run once a chunk
    "backbone-a8": dict(backbone_a_bits=8),
    "gradient": dict(sensitivity="gradient"),  # --bpw: estimate each linear's error per width instead of measuring it
}


def recipe_from_name(name: str) -> QuantRecipe:
    """A preset, or a preset with options: "quantvla-w4a8+gptq" is quantvla-w4a8 with weight_method="gptq";
    "w4a8+bpw4.5" is layout "auto" under a 4.5 bits-per-weight budget."""
    base, *options = name.split("+")
    if base not in RECIPES:
        raise RecipeError(f"unknown recipe {base!r}; choose one of {sorted(RECIPES)} or pass a QuantRecipe")
    unknown = [o for o in options if o not in OPTIONS and _budget(o) is None]
    if unknown:
        raise RecipeError(f"unknown recipe option(s) {unknown} in {name!r}; options: {sorted(OPTIONS)} or bpw<B>")
    changes = {k: v for o in options for k, v in (OPTIONS.get(o) or _budget(o)).items()}
    return RECIPES[base].with_(**changes, name=name) if options else RECIPES[base]


def _budget(option: str) -> dict | None:
    match = re.fullmatch(r"bpw(\d+(?:\.\d+)?)", option)
    return dict(layout="auto", bpw=float(match.group(1))) if match else None


def resolve_recipe(recipe: str | QuantRecipe, layout: str | None = None, bpw: float | None = None) -> QuantRecipe:
    """A recipe object or preset name (with "+option"s), with the layout (and the bits-per-weight budget of layout
    "auto") optionally replaced."""
    if isinstance(recipe, str):
        recipe = recipe_from_name(recipe)
    return recipe.with_(layout=layout, bpw=bpw)
