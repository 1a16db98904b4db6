"""Build and install nfkernels. Install PyTorch first (see README): a bare `torch` requirement
on a machine without torch would pull the CUDA build."""
from setuptools import find_packages, setup

setup(
    name="nfkernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for Normalizer-Free Networks (NFNets) in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nfkernels", "nfkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    # numpy<2.4: Triton 3.6's CPU interpreter (used by the tests) converts 1-element arrays
    # to Python ints, which numpy 2.4 refuses inside kernel loops.
    extras_require={"test": ["pytest>=7", "pytest-benchmark", "numpy<2.4"]},
)
