"""Differential privacy on a silo: exact per-sample gradients for MoE experts (per_sample.py)."""
