"""Registration of the fused ops as PyTorch custom operators (namespace ``nfkernels``).

Registered ops are what makes the Triton kernels work with the rest of PyTorch: torch.compile
traces them without graph breaks (fullgraph=True), fake tensors get shapes, dtypes and strides
from the op's own allocation code, and autograd formulas are attached with
``torch.library.register_autograd``.

Two registrations of the Triton ops, chosen once at import, one code path:
- compiled Triton (the kernels are ``triton.JITFunction``s): ``torch.library.triton_op``, whose
  launches go through ``torch.library.wrap_triton``, so Inductor sees (and can schedule) the
  kernels themselves and the op's body doubles as its fake implementation;
- Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests): an interpreted kernel cannot be put
  in a graph (wrap_triton hands it back unwrapped, and it would dereference fake tensors), so the
  op is an opaque ``torch.library.custom_op`` whose fake implementation is the same body with the
  kernel launches skipped (``launch`` below): the outputs are allocated by the same code either way,
  so fake and real strides cannot disagree.

The CUDA kernels of nfkernels._C get their own ops (``<name>_cuda``, ``define_cuda_op``): always
opaque custom_ops, whose fake implementation is again the op's body with the kernel call
(``cuda_launch``) skipped, and with the same autograd formulas as the Triton ops.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake
from nfkernels.ops._triton import JITFunction

NAMESPACE = "nfkernels"

# Profiling (bench/step_profile.py): (record, run) while ``observe_launches`` is in force.
_launch_observer: tuple[Callable[[str], None], bool] | None = None


@contextlib.contextmanager
def observe_launches(record: Callable[[str], None], *, run: bool = True) -> Iterator[None]:
    """Within the context, every kernel launch of every op (Triton through ``launch``, CUDA
    through ``cuda_launch``) first calls ``record(kernel name)``; with ``run=False`` it then
    launches nothing (the outputs keep whatever their allocation held), so that the host cost
    of everything around the kernels (Python, autograd, dispatch, allocation) can be measured on
    a machine that cannot run them. Process-wide, not thread-local: autograd runs the backward
    of CUDA tensors on its own threads."""
    global _launch_observer
    previous, _launch_observer = _launch_observer, (record, run)
    try:
        yield
    finally:
        _launch_observer = previous


def kernel_name(kernel) -> str:
    """The Python name of a @triton.jit kernel (or of a stand-in for one)."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _is_meta(args) -> bool:
    """Meta tensors (torch.device("meta"): deferred init, shape inference) have no data; the
    op's fake implementation, which is its own body, allocates their outputs and launches nothing."""
    first = _first_tensor(args)
    return first is not None and first.is_meta


def launch(kernel, grid, *args, traceable: bool = True, **meta) -> None:
    """``kernel[grid](*args, **meta)``, traceable: a compiled kernel goes through wrap_triton
    (recorded as a kernel call while tracing, a plain launch otherwise); an interpreted kernel (or
    a test's stand-in for one) runs directly on real tensors and is skipped on fake ones, where
    only the outputs' metadata matters. Nothing runs on meta tensors.

    ``traceable=False`` launches a compiled kernel directly: for callers that are never traced
    (the optimizer, ``agc_``), where wrap_triton's dispatch would only add host time."""
    if _is_meta(args):
        return
    if _launch_observer is not None:
        record, run = _launch_observer
        record(kernel_name(kernel))
        if not run:
            return
    if isinstance(kernel, JITFunction):
        if traceable:
            kernel = torch.library.wrap_triton(kernel)
    else:
        first = _first_tensor(args)
        if first is not None and is_fake(first):
            return
    kernel[grid](*args, **meta)


def define_op(name: str, fn: Callable, *, compiled: bool) -> torch.library.CustomOpDef:
    """Register ``fn`` (type-annotated, functional: fresh outputs, no input mutated) as
    ``torch.ops.nfkernels.<name>``: a triton_op when the kernels are ``compiled``, else an opaque
    custom_op with ``fn`` itself as the fake implementation (see the module docstring)."""
    qualname = f"{NAMESPACE}::{name}"
    if compiled:
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fn)
    return op


def kernels_are_compiled(kernel) -> bool:
    """True when ``kernel`` (a @triton.jit function) is compiled, False under TRITON_INTERPRET=1."""
    return isinstance(kernel, JITFunction)


def define_cuda_op(name: str, fn: Callable) -> torch.library.CustomOpDef:
    """Register ``fn`` (a body that calls ``cuda_launch``) as the opaque custom op
    ``torch.ops.nfkernels.<name>`` with ``fn`` itself as the fake implementation."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
    op.register_fake(fn)
    return op


def _c_arg(arg):
    if arg is None:  # an absent operand
        return 0
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr()
    if isinstance(arg, torch.dtype):
        return dtype_name(arg)
    return arg


def dtype_name(dtype: torch.dtype | None) -> str:
    """The name nfkernels._C knows a dtype by ("float32", ...); "" for an absent parameter."""
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def cuda_launch(kernel: str, device: torch.device, *args) -> None:
    """``nfkernels._C.<kernel>(*args, device index, current stream)`` with each tensor argument
    passed as its data_ptr(), None (an absent tensor) as 0 and each torch.dtype by name.
    Skipped on fake and meta tensors, where only the outputs' metadata matters."""
    first = _first_tensor(args)
    if first is not None and (is_fake(first) or first.is_meta):
        return
    if _launch_observer is not None:
        record, run = _launch_observer
        record(kernel)
        if not run:
            return
    from nfkernels import _backend

    extension = _backend.cuda_extension()
    getattr(extension, kernel)(*map(_c_arg, args), device.index, torch.cuda.current_stream(device).cuda_stream)
