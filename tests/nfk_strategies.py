"""Hypothesis strategies and float64 helpers shared by the property suites (tests/test_properties_*.py).

The suites draw shapes (1, odd, empty, longer than one kernel block), dtypes, memory layouts and
views (channels_last, transposed, sliced, expanded with stride 0), value scales (tiny, huge,
constant rows, zeros, NaN/Inf); the tests parametrize over every backend that can run
(tests/nfk_testing.backends_for) and compare every op with float64 math written in the test
files, never with nfkernels' own torch references. Tensors are generated from a drawn
seed with torch's generator (drawing elements one by one would be slow and shrink badly); what
hypothesis shrinks is the shape, the scale, the layout and the seed.

Profiles ("ci", the default: few examples, derandomized; "thorough": many) live in conftest.py.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import nfkernels as nfk
from nfkernels import _backend
from nfk_testing import DEVICE, ON_GPU, rel_err, tolerance

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
FLOAT_DTYPES = (F64, F32, BF16, F16)
LOW_PRECISION = (BF16, F16)

# Magnitudes of the "tiny" and "huge" value scales, per dtype. They stay where a correct fp32
# (fp64 for fp64) computation neither overflows nor leaves the normal range, squares included
# (norms, variances), so a failure means a wrong result rather than a limit of the format: huge
# fp16 stays well below its 65504 maximum, huge fp32/bf16 keeps squares and cubes (gelu_tanh's
# z³) finite in fp32, tiny fp32/bf16 keeps squares above fp32's smallest normal number.
TINY = {F64: 1e-150, F32: 1e-15, BF16: 1e-15, F16: 1e-3}
HUGE = {F64: 1e100, F32: 1e12, BF16: 1e12, F16: 2e2}

VALUE_KINDS = ("normal", "tiny", "huge", "zeros", "constant", "mixed", "nonfinite")
FINITE_KINDS = tuple(k for k in VALUE_KINDS if k != "nonfinite")

CL = torch.channels_last


def seeds():
    return st.integers(0, 2**31 - 1)


def dtypes(choices=FLOAT_DTYPES):
    return st.sampled_from(tuple(choices))


# ----------------------------------------------------------------------------------- values


def values(seed: int, shape, kind: str, dtype: torch.dtype, *, spread: float = 1.0, offset: float = 0.0):
    """A float64 tensor of ``shape`` with the value scale ``kind``, exactly representable in
    ``dtype`` (it is rounded through it), on the CPU. ``spread``/``offset`` shape "normal"."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    base = torch.randn(shape, generator=gen, dtype=F64)
    if kind == "normal":
        v = base * spread + offset
    elif kind == "tiny":
        v = base * TINY[dtype]
    elif kind == "huge":
        v = base * HUGE[dtype]
    elif kind == "zeros":
        v = torch.zeros(shape, dtype=F64)
    elif kind == "constant":  # every unit constant (a dim-0 slice; the whole tensor if ndim ≤ 1)
        if len(shape) >= 2 and base.numel():
            v = base.reshape(shape[0], -1)[:, :1].expand(shape[0], math.prod(shape[1:])).reshape(shape)
        elif base.numel():
            v = base.reshape(-1)[:1].expand(base.numel()).reshape(shape)
        else:
            v = base
        v = v * spread + offset
    elif kind == "mixed":  # per-element magnitudes over six decades
        v = base * 10.0 ** (torch.rand(shape, generator=gen, dtype=F64) * 6 - 3)
    elif kind == "nonfinite":
        v = (base * spread + offset).reshape(-1)
        if v.numel():
            count = max(1, v.numel() // 6)
            where = torch.randperm(v.numel(), generator=gen)[:count]
            which = torch.randint(0, 3, (count,), generator=gen)
            specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)
            v[where] = specials[which]
        v = v.reshape(shape)
    else:
        raise ValueError(kind)
    return v.to(dtype).to(F64)


def value_kinds(finite_only: bool = False):
    return st.sampled_from(FINITE_KINDS if finite_only else VALUE_KINDS)


# ---------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How a tensor's memory is laid out: kind in contiguous, channels_last, transposed,
    sliced (a strided view into a larger NaN-filled buffer, at an offset), expanded (a stride-0
    broadcast along ``dim``: the values become constant along it)."""

    kind: str
    dim: int = 0

    def __str__(self):
        return self.kind if self.kind in ("contiguous", "channels_last", "transposed") else f"{self.kind}({self.dim})"


def layouts(ndim: int, kinds=("contiguous", "channels_last", "transposed", "sliced", "expanded")):
    """Layouts that make sense for an ``ndim`` tensor (channels_last needs 4-D, transposed 2+)."""
    options = []
    for kind in kinds:
        if kind == "contiguous":
            options.append(st.just(Layout(kind)))
        elif kind == "channels_last" and ndim == 4:
            options.append(st.just(Layout(kind)))
        elif kind == "transposed" and ndim >= 2:
            options.append(st.just(Layout(kind)))
        elif kind in ("sliced", "expanded") and ndim >= 1:
            options.append(st.builds(Layout, st.just(kind), st.integers(0, ndim - 1)))
    return st.one_of(*options)


def lay_out(v64: torch.Tensor, dtype: torch.dtype, layout: Layout, *, device=DEVICE, fill=math.nan):
    """(storage, view): ``view`` has ``v64``'s values in ``dtype`` (for "expanded", the values
    narrowed to index 0 along the dim and broadcast back) and ``layout``'s strides; ``storage``
    is the tensor that owns the memory (a leaf to put requires_grad on; it is ``view`` itself
    for dense layouts). Gaps of a sliced layout hold ``fill`` (NaN: a stray read shows)."""
    v = v64.to(device=device, dtype=dtype)
    kind, d = layout.kind, layout.dim
    if kind == "channels_last" and v.dim() == 4:
        t = v.contiguous(memory_format=CL)
        return t, t
    if kind == "transposed" and v.dim() >= 2:
        t = v.transpose(-1, -2).contiguous()
        return t, t.transpose(-1, -2)
    if kind == "sliced" and v.dim() >= 1:
        big_shape = list(v.shape)
        big_shape[d] = 2 * big_shape[d] + 1
        big = torch.full(big_shape, fill, dtype=dtype, device=device)
        index = [slice(None)] * v.dim()
        index[d] = slice(1, None, 2)
        big[tuple(index)] = v
        return big, big[tuple(index)]
    if kind == "expanded" and v.dim() >= 1 and v.shape[d] > 0:
        small = v.narrow(d, 0, 1).clone()
        return small, small.expand(v.shape)
    t = v.clone()
    return t, t


def leaf_view(v64, dtype, layout, requires_grad=True, device=DEVICE):
    """A differentiable input laid out as ``layout``: the op receives ``view``; its gradient
    with respect to ``view`` (what the op's backward returns) is kept in ``view.grad``."""
    storage, view = lay_out(v64, dtype, layout, device=device)
    if not requires_grad:
        return view
    storage.requires_grad_(True)
    if view is storage:
        return storage
    view = _view_again(storage, view)
    view.retain_grad()
    return view


def _view_again(storage: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The same view, recorded by autograd (made after requires_grad was set)."""
    return storage.as_strided(view.shape, view.stride(), view.storage_offset())


def dout_layouts(ndim: int):
    """Layouts of an incoming gradient: as the input layouts, and "expanded" of a single value
    (what ``out.sum().backward()`` hands the op)."""
    base = layouts(ndim, ("contiguous", "channels_last", "transposed", "sliced"))
    return st.one_of(base, st.just(Layout("broadcast")))


def make_dout(seed, shape, dtype, layout: Layout, device=DEVICE):
    if layout.kind == "broadcast":
        value = torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
        return value.to(device).expand(shape)
    v = values(seed, shape, "normal", dtype)
    return lay_out(v, dtype, layout, device=device)[1]


# ---------------------------------------------------------------------------------- shapes


def dim_sizes(max_size=7, allow_zero=False):
    """Small sizes biased to 1 and odd numbers (interpreter-friendly)."""
    lo = 0 if allow_zero else 1
    return st.one_of(st.sampled_from([s for s in (0, 1, 2, 3, 5, 7) if lo <= s <= max_size]),
                     st.integers(lo, max_size))


# --------------------------------------------------------------------------- block patching


@contextlib.contextmanager
def patched(module, **values_):
    """Temporarily set module-level tuning knobs (block/tile sizes) that exist; lowering them
    makes small tensors span several blocks, as large ones do. Unknown names are ignored so a
    renamed knob costs coverage, not a crash."""
    old = {}
    try:
        for name, value in values_.items():
            if hasattr(module, name):
                old[name] = getattr(module, name)
                setattr(module, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


# ---------------------------------------------------------------------------- comparisons


def masked_rel_err(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """rel_err over the positions where ``mask`` holds (all by default)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if mask is not None:
        mask = mask.cpu()
        got, ref = got[mask], ref[mask]
    return rel_err(got, ref)


def assert_matches(got, ref, tol, what, *, nan_ok=None, skip=None, floor=None):
    """``got`` equals the float64 ``ref``: the same shape, NaN and ±inf at exactly the same
    places, and the finite elements within relative error ``tol`` (‖got − ref‖/‖ref‖ over them).

    ``nan_ok`` (bool mask): places where NaN is also accepted (an indeterminate form such as
    inf·0 whose float64 limit exists). ``skip`` (bool mask): places not compared at all.
    ``floor`` (per-element allowance): absolute error forgiven at each place, for rounding
    that the accumulation dtype cannot avoid (cancellation); what exceeds it counts.
    """
    assert got is not None, f"{what}: no result (None)"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    keep = torch.ones(g.shape, dtype=torch.bool)
    if skip is not None:
        keep &= ~skip.cpu()
    if nan_ok is not None:
        keep &= ~(nan_ok.cpu() & torch.isnan(g))
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = (test(g) != test(r)) & keep
        if differ.any():
            idx = differ.nonzero()[0].tolist()
            raise AssertionError(
                f"{what}: {int(differ.sum())} place(s) where {name} differs from float64 math, first at {idx}: "
                f"got {g[tuple(idx)].item()!r}, expected {r[tuple(idx)].item()!r}")
    finite = keep & torch.isfinite(r) & torch.isfinite(g)
    if floor is not None:
        floor = floor.detach().double().cpu().reshape(g.shape)
        floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))  # undefined: no allowance
        diff = ((g - r).abs() - floor).clamp(min=0)[finite]
        denom = r[finite].norm().item()
        err = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    else:
        err = masked_rel_err(g, r, finite)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e} over the finite elements"


# Triton 3.6's CPU interpreter converts fp32 to bf16 by truncation (round toward zero), not
# round-to-nearest-even as compiled Triton does: an error below one bf16 ulp (2^-7 relative)
# instead of half of one. An artefact of the interpreter, allowed for there only.
INTERPRETER_BF16_TRUNCATION = 2.0**-7


def interpreter_mangles(backend: str, computed_in, stored_as) -> bool:
    """True when Triton's CPU interpreter would cast fp64 to bf16 (a kernel computing in fp64
    because an operand is fp64, storing a bf16 result): Triton 3.6's interpreter converts it
    with numpy's float-to-integer astype(uint16), which is garbage; compiled Triton converts
    correctly. Such cases cannot be tested here (they run on a GPU)."""
    return (backend == "triton" and _backend.triton_interpreting() and F64 in tuple(computed_in)
            and BF16 in tuple(stored_as))


def tol_for(dtypes_, backend: str, plain_err: float | None = None, roundings: int = 1) -> float:
    """The tolerance of docs/design.md §6 for a result involving ``dtypes_`` (the least precise one
    decides); fp16/bf16: twice plain PyTorch's own error in that dtype, plus atol. ``roundings``:
    how many bf16 roundings the result went through (steps of an optimizer, for the interpreter)."""
    dtypes_ = list(dtypes_)
    if any(d in LOW_PRECISION for d in dtypes_):
        tol = tolerance(next(d for d in dtypes_ if d in LOW_PRECISION), backend, plain_err)
        if BF16 in dtypes_ and backend == "triton" and _backend.triton_interpreting():
            tol += roundings * INTERPRETER_BF16_TRUNCATION
        return tol
    if F32 in dtypes_:
        return tolerance(F32, backend)
    return tolerance(F64, backend)


def plain_err(plain, ref, mask=None) -> float:
    """Plain PyTorch's own error (computed in the low dtype, ``plain``'s) against float64, over
    the places finite in both (so an overflow of the plain computation does not make the bound
    infinite); at least the error of the float64 result correctly rounded to that dtype (on a few
    elements plain PyTorch can be luckier than any rounding of the exact result)."""
    p, r = plain.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(p) & torch.isfinite(r)
    if mask is not None:
        finite &= mask.cpu()
    rounded = ref.detach().cpu().to(plain.dtype).double()
    return max(masked_rel_err(p, r, finite), masked_rel_err(rounded, r, finite & torch.isfinite(rounded)))


def other_device():
    """A device other than DEVICE for device-mix cases: cpu next to cuda, "meta" next to cpu."""
    return torch.device("cpu") if ON_GPU else torch.device("meta")


def snapshot(tensors):
    """(version, clone) of each tensor, to show that nothing was written."""
    return [(t._version, t.detach().clone()) for t in tensors]


def assert_unchanged(tensors, before, what):
    for i, (t, (version, clone)) in enumerate(zip(tensors, before)):
        assert t._version == version, f"{what}[{i}] was written (version {version} -> {t._version})"
        torch.testing.assert_close(t.detach(), clone, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}[{i}] changed: {m}")


def names_argument(message: str, name: str) -> bool:
    """The message names ``name`` as a whole word (so "bias" is not found in "shortcut_bias")."""
    return re.search(r"(?<![\w.\[\]'])" + re.escape(name) + r"(?![\w])", message) is not None


def assert_bad_argument_rejected(table, make_valid, call, arg: str, index: int, backend: str) -> None:
    """Replaces argument ``arg`` of a valid call (``make_valid()``, a dict) by the corruption
    ``table[arg][index]`` = (description, args -> bad value) and runs ``call(args)``: it must raise
    a TypeError or ValueError naming ``arg``, with every input tensor left as it was."""
    import pytest

    desc, corrupt = table[arg][index]
    args = make_valid()
    args[arg] = corrupt(args)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor) and t.layout == torch.strided
               and t.device.type != "meta"]
    before = snapshot(tensors)
    with nfk.use_backend(backend), pytest.raises((TypeError, ValueError)) as info:
        call(args)
    assert names_argument(str(info.value), arg), f"{arg} ({desc}): message does not name it: {info.value}"
    assert_unchanged(tensors, before, "inputs")


def backend_runner(module, **small_knobs):
    """``running(backend, small_blocks)``: a context with ``use_backend(backend)`` and, when
    ``small_blocks``, ``module``'s tuning knobs set to ``small_knobs`` (tiles of a few elements,
    so that these small tensors span many tiles and blocks, as large ones do)."""
    def running(backend: str, small_blocks: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(nfk.use_backend(backend))
        if small_blocks:
            stack.enter_context(patched(module, **small_knobs))
        return stack

    return running
