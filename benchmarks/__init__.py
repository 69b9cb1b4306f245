"""Benchmarks; `python -m benchmarks.gpu` is the one run as a module (the others are scripts)."""
