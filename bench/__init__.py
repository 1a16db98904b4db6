"""Benchmarks of nfkernels against unfused PyTorch references (run: python -m bench)."""
