"""Benchmark suite: relattn's attention paths against fused attention and the usual peers."""
