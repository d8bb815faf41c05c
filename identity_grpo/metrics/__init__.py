"""Evaluation metrics computed as published benchmarks compute them (:mod:`identity_grpo.metrics.opens2v`)."""
