"""Every timm NormFreeNet family (NFNet-F in DeepMind's and timm's designs, NFNet-L and ECA-NFNet-L,
NF-RegNet-B, NF-ResNet with and without SE/ECA) built from the fused layers, with timm's model
names, parameter names and model API (see nfkernels.models.nfnet)."""
from nfkernels.models import nfnet as _nfnet
from nfkernels.models.nfnet import *  # noqa: F401,F403  (the names of nfnet.__all__)

__all__ = list(_nfnet.__all__)
