"""One pass per file; this package only re-exports them."""
from qvla_compiler.passes.apply_layout import apply_layout
from qvla_compiler.passes.assign_regions import assign_regions
from qvla_compiler.passes.check_schedule import check_schedule, record_schedule
from qvla_compiler.passes.classify_linears import classify_linears, find_attention_cores
from qvla_compiler.passes.insert_observers import insert_observers, remove_observers
from qvla_compiler.passes.quantize_linears import quantize_linears

__all__ = ["apply_layout", "assign_regions", "check_schedule", "classify_linears", "find_attention_cores",
           "insert_observers", "quantize_linears", "record_schedule", "remove_observers"]
