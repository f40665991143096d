"""LIBERO closed-loop evaluation (see evaluate.py)."""
