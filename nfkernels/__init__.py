"""nfkernels: fused Triton and CUDA kernels for Normalizer-Free Networks (Brock et al. 2021)."""
from nfkernels._backend import BACKENDS, get_backend, set_backend, use_backend
from nfkernels.clip import agc_, agc_parameters
from nfkernels.functional import scaled_act, se_gate_residual, weight_standardize
from nfkernels.convert import ConversionReport, convert
from nfkernels.ops.scaled_act import NF_GAMMA

from nfkernels import models, nn, optim  # noqa: E402 (subpackages import the functions above)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ConversionReport",
    "NF_GAMMA",
    "agc_",
    "agc_parameters",
    "convert",
    "get_backend",
    "models",
    "nn",
    "optim",
    "scaled_act",
    "se_gate_residual",
    "set_backend",
    "use_backend",
    "weight_standardize",
]
