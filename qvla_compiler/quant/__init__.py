"""Quantization math as pure tensor functions — quantizers, observers, Hadamard, DuQuant, SmoothQuant, ATM/OHB
scales. Nothing here reads or rewrites a graph; `passes/` does that and calls in here."""
