"""nfkernels: fused Triton and CUDA kernels for Normalizer-Free Networks (Brock et al. 2021)."""
from nfkernels._backend import BACKENDS, get_backend, set_backend, use_backend
from nfkernels.functional import weight_standardize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "weight_standardize",
]
