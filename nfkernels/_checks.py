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
