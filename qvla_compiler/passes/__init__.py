"""One pass per file; this package only re-exports them."""
from qvla_compiler.passes.apply_layout import apply_layout
from qvla_compiler.passes.apply_plan import apply_plan
from qvla_compiler.passes.assign_regions import assign_regions
from qvla_compiler.passes.canonicalize_linears import canonicalize_linears
from qvla_compiler.passes.check_accumulator_bounds import check_accumulator_bounds
from qvla_compiler.passes.check_schedule import check_schedule, record_schedule
from qvla_compiler.passes.classify_linears import classify_linears, find_attention_cores
from qvla_compiler.passes.fold_attention_scales import fold_attention_scales
from qvla_compiler.passes.fold_computed_weights import fold_computed_weights
from qvla_compiler.passes.inline_subgraphs import inline_subgraphs
from qvla_compiler.passes.insert_observers import insert_observers, remove_observers
from qvla_compiler.passes.load_plan_tensors import load_plan_tensors
from qvla_compiler.passes.normalize_graph import normalize_graph
from qvla_compiler.passes.observe_attention import observe_attention, remove_attention_observers
from qvla_compiler.passes.quantize_linears import (FloatWeightRelease, keep_unquantizable_float,
                                                      quantize_linears)
from qvla_compiler.passes.record_plan import linear_fingerprints, record_plan
from qvla_compiler.passes.rotate_and_smooth import fit_transforms, needs_rotation, rotate_and_smooth
from qvla_compiler.passes.rotate_common import reset_observers, track_hessians

__all__ = ["FloatWeightRelease", "apply_layout", "apply_plan", "assign_regions", "canonicalize_linears", "check_accumulator_bounds", "check_schedule",
           "classify_linears", "find_attention_cores", "fit_transforms", "fold_attention_scales",
           "fold_computed_weights", "inline_subgraphs", "insert_observers", "keep_unquantizable_float", "linear_fingerprints",
           "load_plan_tensors", "needs_rotation", "normalize_graph", "observe_attention", "quantize_linears",
           "record_plan", "record_schedule", "remove_attention_observers", "remove_observers", "reset_observers",
           "rotate_and_smooth", "track_hessians"]
