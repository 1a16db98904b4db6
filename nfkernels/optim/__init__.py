"""Fused optimizers: SGD with unit-wise Adaptive Gradient Clipping (docs/design.md §5)."""
from nfkernels.optim.sgd_agc import SGD_AGC, nfnet_param_groups

__all__ = ["SGD_AGC", "nfnet_param_groups"]
