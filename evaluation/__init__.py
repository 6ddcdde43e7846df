"""Evaluation helpers for benchmarks and the demo: diversity/fidelity metrics and the exact empirical denoiser."""
