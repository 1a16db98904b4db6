"""Triton, when it is installed; a stand-in that defines the kernels but refuses to launch them
when it is not.

Triton has wheels for Linux only, and the torch path of every op needs none of it, so nfkernels
must import without it (macOS, Windows, minimal CPU installs). The op modules write their kernels
as usual (``@triton.jit``, ``tl.constexpr`` annotations, ``triton.cdiv`` in the launchers) against
the names exported here. Without triton, ``triton.jit`` returns an ``UnavailableKernel`` whose
launch raises; backend selection (nfkernels._backend) never picks Triton then, and an explicit
``backend="triton"`` raises before any launch, so the stand-in is a second line of defence.
"""
from __future__ import annotations

import functools
import types

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError as error:  # triton missing (or broken): the torch and CUDA paths still work
    IMPORT_ERROR: ImportError | None = error
else:
    IMPORT_ERROR = None

INSTALL_HINT = ("pip install triton (Linux; CUDA builds of torch bring the matching version), "
                "or use backend 'torch' or 'cuda'")


def available() -> bool:
    """True when triton imported."""
    return IMPORT_ERROR is None


if IMPORT_ERROR is not None:

    class JITFunction:  # noqa: F811 (no kernel is an instance: none is compiled)
        pass

    class UnavailableKernel:
        """What ``@triton.jit`` makes of a kernel without triton: importable, never launchable."""

        def __init__(self, fn):
            functools.update_wrapper(self, fn)

        def __getitem__(self, grid):
            raise RuntimeError(
                f"Triton kernel {self.__name__} cannot run: triton is not installed "
                f"({IMPORT_ERROR}); {INSTALL_HINT}")

    def _jit(fn=None, **_options):
        return UnavailableKernel(fn) if fn is not None else UnavailableKernel

    def _cdiv(x: int, y: int) -> int:
        return (x + y - 1) // y

    class _Constexpr:
        """Only ever used as an annotation of kernel parameters."""

    tl = types.SimpleNamespace(constexpr=_Constexpr)
    triton = types.SimpleNamespace(jit=_jit, cdiv=_cdiv)  # what the op modules use

__all__ = ["IMPORT_ERROR", "INSTALL_HINT", "JITFunction", "available", "tl", "triton"]
