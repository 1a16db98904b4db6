"""Backend selection: which implementation ("torch", "triton", "cuda") runs an op.

The choice is, in order of precedence: the innermost ``use_backend`` context, the value given
to ``set_backend``, the ``NFK_BACKEND`` environment variable read at import, and "auto".
"auto" runs the torch reference on CPU tensors and, on CUDA tensors, whichever of the Triton and
CUDA kernels bench/ measured faster for the op on that device class (nfkernels._autotable; Triton
where nothing was measured, or the extension is not built or its CUDA runtime sees no GPU). A
backend named explicitly that cannot run the call raises ``RuntimeError``; nothing falls back
silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Iterator

import torch

from nfkernels import _autotable
from nfkernels.ops import _triton

BACKENDS = ("auto", "torch", "triton", "cuda")


def _validate(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return key


class _InvalidEnvironmentBackend(str):
    """An NFK_BACKEND value that names no backend. Raising at import would make ``import
    nfkernels`` itself fail, far from the cause, and running "auto" instead would ignore the
    user's request silently; so the import warns, and the first op that runs under it raises
    (``set_backend``/``use_backend`` override it, as they override any NFK_BACKEND)."""

    def error(self) -> ValueError:
        return ValueError(
            f"environment variable NFK_BACKEND={str(self)!r} names no backend; expected one of "
            f"{BACKENDS} (unset it, fix it, or call nfkernels.set_backend)")


def _from_env() -> str:
    value = os.environ.get("NFK_BACKEND", "auto")
    try:
        return _validate(value)
    except ValueError:
        invalid = _InvalidEnvironmentBackend(value)
        warnings.warn(str(invalid.error()), RuntimeWarning, stacklevel=2)
        return invalid


_default_backend = _from_env()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("nfk_backend", default=None)


def set_backend(name: str) -> None:
    """Set the process-wide backend: "auto", "torch", "triton" or "cuda"."""
    global _default_backend
    _default_backend = _validate(name)


def get_backend() -> str:
    """The backend in force here (the innermost ``use_backend``, else ``set_backend``'s, else
    NFK_BACKEND's); raises ValueError when that is an invalid NFK_BACKEND."""
    override = _override.get()
    if override is not None:
        return override
    if isinstance(_default_backend, _InvalidEnvironmentBackend):
        raise _default_backend.error()
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed calls with backend ``name``; thread- and task-local, nestable."""
    token = _override.set(_validate(name))
    try:
        yield _override.get()
    finally:
        _override.reset(token)


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton imports (it is optional: the torch path needs none of it)."""
    return _triton.available()


@functools.lru_cache(maxsize=None)  # a failed import is retried on every call otherwise
def cuda_extension():
    """The compiled extension ``nfkernels._C``, or None when it was not built."""
    try:
        from nfkernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def _extension_device_count(extension) -> int:
    # Per process: the devices a runtime sees do not change while it runs, and asking costs a
    # driver call on every op otherwise.
    return extension.device_count()


def cuda_extension_usable() -> bool:
    """True when nfkernels._C is built and its own CUDA runtime sees a GPU. torch may see one
    while the extension does not: its statically linked runtime can need a newer driver."""
    extension = cuda_extension()
    return extension is not None and _extension_device_count(extension) > 0


def _runtime_version(extension) -> str:
    version = extension.cuda_runtime_version()
    return f"{version // 1000}.{version % 1000 // 10}"


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def cuda_device_name(device: torch.device) -> str:
    """The name of a CUDA device (the key of nfkernels._autotable); "" without a usable GPU."""
    if not torch.cuda.is_available():
        return ""
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def _auto(op: str, device: torch.device, supported: tuple[str, ...]) -> str:
    if device.type != "cuda":
        return "torch"
    has_triton = "triton" in supported and triton_available()
    has_cuda = "cuda" in supported and cuda_extension_usable()
    if has_cuda and (not has_triton or _autotable.preferred_backend(op, cuda_device_name(device)) == "cuda"):
        return "cuda"
    return "triton" if has_triton else "torch"


def resolve(op: str, device: torch.device, supported: tuple[str, ...] = ("torch", "triton")) -> str:
    """The concrete backend that runs ``op`` on ``device``; raises RuntimeError if it cannot."""
    name = get_backend()
    if name == "auto":
        return _auto(op, device, supported)
    if name not in supported:
        raise RuntimeError(
            f"{op}: backend {name!r} has no implementation of this op (it has: {', '.join(supported)})"
        )
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which does not import "
                               f"here ({_triton.IMPORT_ERROR}); {_triton.INSTALL_HINT}")
        if device.type == "cuda":
            return name
        if device.type == "cpu" and triton_interpreting():
            return name
        raise RuntimeError(
            f"{op}: backend 'triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
            f"set before triton is imported); got tensors on {device}"
        )
    if name == "cuda":
        if cuda_extension() is None:
            raise RuntimeError(
                f"{op}: backend 'cuda' needs the compiled extension nfkernels._C, which is not built "
                "(install with nvcc on the PATH; see README)"
            )
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' runs on CUDA tensors; got tensors on {device}")
        if not cuda_extension_usable():
            raise RuntimeError(
                f"{op}: backend 'cuda': nfkernels._C is built, but its CUDA runtime "
                f"{_runtime_version(cuda_extension())} sees no GPU; is the NVIDIA driver too old for "
                "that runtime (or CUDA_VISIBLE_DEVICES empty)? Update the driver, or use backend "
                "'triton' or 'auto'"
            )
    return name
