"""Drop-in layers built from the fused ops, with timm's parameter names and shapes."""
from nfkernels.nn.act import ScaledAct
from nfkernels.nn.attn import SqueezeExcite, make_divisible
from nfkernels.nn.block import DownsampleAvg, NFBlock
from nfkernels.nn.conv import WSConv2d, pad_same

__all__ = ["ScaledAct", "SqueezeExcite", "NFBlock", "DownsampleAvg", "WSConv2d", "make_divisible", "pad_same"]
