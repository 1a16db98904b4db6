"""NFNet F0–F7 built from the fused layers, timm dm_nfnet-compatible."""
from nfkernels.models.nfnet import (TINY_CONFIG, NFNet, NFNetConfig, nfnet, nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3,
                                    nfnet_f4, nfnet_f5, nfnet_f6, nfnet_f7, paper_regularization)

__all__ = ["TINY_CONFIG", "NFNet", "NFNetConfig", "nfnet", "paper_regularization"] + [f"nfnet_f{i}" for i in range(8)]
