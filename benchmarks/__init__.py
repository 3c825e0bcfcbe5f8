"""Benchmarks of smt_kernels (run as python -m benchmarks.<name>)."""
