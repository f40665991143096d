"""One pass per file; this package only re-exports them."""
from qvla_compiler.passes.apply_layout import apply_layout
from qvla_compiler.passes.assign_regions import assign_regions
from qvla_compiler.passes.check_accumulator_bounds import check_accumulator_bounds
from qvla_compiler.passes.check_schedule import check_schedule, record_schedule
from qvla_compiler.passes.classify_linears import classify_linears, find_attention_cores
from qvla_compiler.passes.fold_attention_scales import fold_attention_scales
from qvla_compiler.passes.fold_computed_weights import fold_computed_weights
from qvla_compiler.passes.insert_observers import insert_observers, remove_observers
from qvla_compiler.passes.normalize_graph import normalize_graph
from qvla_compiler.passes.observe_attention import observe_attention, remove_attention_observers
from qvla_compiler.passes.quantize_linears import quantize_linears

__all__ = ["apply_layout", "assign_regions", "check_accumulator_bounds", "check_schedule", "classify_linears",
           "find_attention_cores", "fold_attention_scales", "fold_computed_weights", "insert_observers",
           "normalize_graph", "observe_attention", "quantize_linears", "record_schedule", "remove_attention_observers", "remove_observers"]
