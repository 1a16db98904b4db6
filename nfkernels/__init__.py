"""nfkernels: fused Triton and CUDA kernels for Normalizer-Free Networks (Brock et al. 2021)."""
from nfkernels._backend import BACKENDS, get_backend, set_backend, use_backend
from nfkernels.clip import agc_, agc_parameters
from nfkernels.functional import weight_standardize
from nfkernels.functional import scaled_act
from nfkernels.ops.scaled_act import NF_GAMMA
from nfkernels.functional import se_gate_residual

from nfkernels import optim

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "NF_GAMMA",
    "agc_",
    "agc_parameters",
    "get_backend",
    "optim",
    "scaled_act",
    "se_gate_residual",
    "set_backend",
    "use_backend",
    "weight_standardize",
]
