"""NFNet F0–F7 built from the fused layers: timm's dm_nfnet_fX architecture and model API
(timm's nfnet_fX is a different architecture; see nfkernels.models.nfnet)."""
from nfkernels.models.nfnet import (TIMM_NAMES, TINY_CONFIG, VARIANT_NAMES, FeatureInfo, NFNet, NFNetConfig,
                                    NFNetFeatures, dm_nfnet_f0, dm_nfnet_f1, dm_nfnet_f2, dm_nfnet_f3, dm_nfnet_f4,
                                    dm_nfnet_f5, dm_nfnet_f6, nfnet, nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3, nfnet_f4,
                                    nfnet_f5, nfnet_f6, nfnet_f7, paper_regularization, pretrained_cfg_for)

__all__ = (["FeatureInfo", "NFNet", "NFNetConfig", "NFNetFeatures", "TIMM_NAMES", "TINY_CONFIG", "VARIANT_NAMES",
            "nfnet", "paper_regularization", "pretrained_cfg_for"]
           + [f"nfnet_f{i}" for i in range(8)] + [f"dm_nfnet_f{i}" for i in range(7)])
