"""Helpers the op launchers share: memory views, output allocation, block sizes."""
from __future__ import annotations

import contextlib
import os

import torch

# Tests set this (or NFK_POISON=1) so every output buffer starts as NaN: an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("NFK_POISON", "0") not in ("", "0")


def new_empty(*args, **kwargs) -> torch.Tensor:
    out = torch.empty(*args, **kwargs)
    return out.fill_(float("nan")) if POISON_OUTPUTS and out.is_floating_point() else out


def new_empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(t, **kwargs)
    return out.fill_(float("nan")) if POISON_OUTPUTS and out.is_floating_point() else out


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` put every index at the same element offset: equal shapes and equal
    strides on every dim longer than 1 (a size-1 dim's stride is arbitrary: a 1x1 conv weight's
    gradient may carry other strides there than the weight and still share its memory order)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dim0_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A (t.shape[0], -1) view of ``t``'s memory whose rows are its dim-0 slices.

    Works whenever each dim-0 slice is one dense block of memory (contiguous, channels_last and
    any other dense permutation of the trailing dims); the order of elements inside a row then
    follows memory, which is all a per-row reduction or map needs. Returns None otherwise.
    A ``torch.empty_like`` of such a tensor has the same strides, so its view lines up.
    """
    if t.dim() == 0:
        return None
    trailing = sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(0, *trailing)
    if not permuted.is_contiguous():
        return None
    return permuted.reshape(t.shape[0], -1)


def contiguous_dim0_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor, rows): ``t`` itself with its row view, or a contiguous copy and its rows."""
    rows = dim0_rows(t)
    if rows is None:
        t = t.contiguous()
        rows = t.view(t.shape[0], -1)
    return t, rows


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current: Triton launches on the current device, not the tensors'."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
