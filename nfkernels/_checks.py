"""Argument validation shared by the public functions: clear TypeError/ValueError messages."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}); got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D; got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims; got shape {tuple(t.shape)}")
    return t


def check_optional_tensor(op: str, name: str, t: object, **kw) -> torch.Tensor | None:
    return None if t is None else check_tensor(op, name, t, **kw)


def check_numel(op: str, name: str, t: torch.Tensor | None, numel: int, what: str) -> None:
    if t is not None and t.numel() != numel:
        raise ValueError(f"{op}: {name} must have {numel} elements ({what}); got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{op}: {k} is on {d} but {first_name} is on {first}; all tensors must share a device")
    return first


def check_same_dtype(op: str, **tensors: torch.Tensor | None) -> torch.dtype:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter((k, v.dtype) for k, v in present.items()))
    for k, v in present.items():
        if v.dtype != first:
            raise TypeError(f"{op}: {k} has dtype {v.dtype} but {first_name} has {first}; they must match")
    return first


def check_no_internal_overlap(op: str, name: str, t: torch.Tensor, why: str) -> None:
    """Rejects a tensor with several elements at one address (a stride 0 over a dim of size > 1,
    as ``expand`` makes: torch's own test for definite internal overlap)."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ValueError(
            f"{op}: {name} has elements that share memory (stride {tuple(t.stride())} for shape "
            f"{tuple(t.shape)}, e.g. an expand()); {why}, so it must be dense: pass a .clone()"
        )


def check_float(op: str, name: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0; got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{op}: {name} must be >= 0; got {value}")
    return value


def check_choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}; got {value!r}")
    return value
