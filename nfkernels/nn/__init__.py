"""Drop-in layers built from the fused ops, with timm's parameter names and shapes."""
from nfkernels.nn.act import ScaledAct
from nfkernels.nn.attn import EfficientChannelAttention, SqueezeExcite, create_attn, make_divisible
from nfkernels.nn.block import DownsampleAvg, NFBlock
from nfkernels.nn.conv import (
    WSConv2d,
    batch_weight_standardization,
    freeze_standardized_weights,
    pad_same,
    unfreeze_standardized_weights,
)

__all__ = ["ScaledAct", "SqueezeExcite", "EfficientChannelAttention", "create_attn", "NFBlock", "DownsampleAvg",
           "WSConv2d", "make_divisible", "pad_same", "freeze_standardized_weights", "unfreeze_standardized_weights",
           "batch_weight_standardization"]
