"""Triton kernels for activation-sparse inference (see each file stem in tests/ and benchmarks/)."""
