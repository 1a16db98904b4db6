"""Public Adaptive Gradient Clipping: ``agc_`` and ``agc_parameters`` (docs/design.md §5 "AGC").

The math and kernels live in nfkernels.ops.agc; this module validates arguments, splits the
parameters into (device, dtype) groups (one fused launch each) and handles sharded DTensors.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Sequence

import torch

from nfkernels import _backend
from nfkernels._checks import FLOAT_DTYPES, check_float, check_no_internal_overlap, check_tensor
from nfkernels.ops import agc as _agc

AGC_BACKENDS = ("torch", "triton", "cuda")


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def named_params(op: str, parameters: object) -> list[tuple[str, torch.Tensor]]:
    """(argument path, tensor) for a tensor, an iterable of tensors, or param groups; no repeats."""
    if isinstance(parameters, torch.Tensor):
        items = [("parameters", parameters)]
    elif isinstance(parameters, dict):
        items = _group_items(op, "parameters", parameters)
    elif isinstance(parameters, Iterable) and not isinstance(parameters, (str, bytes)):
        items = []
        for i, item in enumerate(parameters):
            if isinstance(item, dict):
                items += _group_items(op, f"parameters[{i}]", item)
            else:
                items.append((f"parameters[{i}]", item))
    else:
        raise TypeError(
            f"{op}: parameters must be a tensor, an iterable of tensors or of param groups; got {type(parameters).__name__}"
        )
    seen, out = set(), []
    for name, p in items:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(p).__name__}")
        if id(p) not in seen:  # a repeated tensor would be clipped twice, racing in one launch
            seen.add(id(p))
            out.append((name, p))
    return out


def _group_items(op: str, where: str, group: dict) -> list[tuple[str, object]]:
    if "params" not in group:
        raise TypeError(f"{op}: {where} is a dict without a 'params' entry (a param group needs one)")
    params = group["params"]
    if isinstance(params, torch.Tensor):
        return [(f"{where}['params']", params)]
    return [(f"{where}['params'][{j}]", p) for j, p in enumerate(params)]


def check_param_and_grad(op: str, name: str, p: torch.Tensor, *, writes: str) -> torch.Tensor:
    """Validates ``p`` and its gradient (of any float dtype: torch allows it to differ from the
    parameter's); returns the gradient. ``writes`` ("grad" or "param") is the tensor the caller
    updates in place, which must not have elements sharing memory."""
    check_tensor(op, name, p)
    grad = p.grad
    check_tensor(op, f"{name}.grad", grad, dtypes=FLOAT_DTYPES)
    if grad.device != p.device:
        raise ValueError(f"{op}: {name}.grad is on {grad.device} but {name} is on {p.device}; they must share a device")
    if grad.shape != p.shape:
        raise ValueError(f"{op}: {name}.grad has shape {tuple(grad.shape)} but {name} has {tuple(p.shape)}")
    written, written_name = (grad, f"{name}.grad") if writes == "grad" else (p, name)
    check_no_internal_overlap(op, written_name, written, "it is updated in place")
    return grad


class ShardedWholeUnits:
    """Whole-tensor units (ndim ≤ 1) of dim-0-sharded DTensors: each rank holds part of the unit,
    so squared norms are summed across the shards' ranks before the clip factor is formed."""

    def __init__(self):
        self.items: list[tuple[torch.Tensor, torch.Tensor, object, tuple[int, ...]]] = []

    def add(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        mesh_dims = tuple(i for i, pl in enumerate(weight.placements) if pl.is_shard())
        self.items.append((weight.to_local(), grad.to_local(), weight.device_mesh, mesh_dims))

    def clip_(self, clip_factor: float, eps: float) -> None:
        """All_reduce of the squared norms: one per (mesh, mesh dim, device, dtype), then scale."""
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for w, g, mesh, dims in self.items:
            groups.setdefault((id(mesh), dims, g.device, g.dtype, w.dtype), []).append((w, g))
        meshes = {id(mesh): mesh for _, _, mesh, _ in self.items}
        for (mesh_id, dims, device, g_dtype, w_dtype), pairs in groups.items():
            acc = _agc.acc_dtype_for(g_dtype, w_dtype)
            sq = torch.stack([
                torch.stack([w.to(acc).square().sum(), g.to(acc).square().sum()]) for w, g in pairs
            ])
            for d in dims:
                torch.distributed.all_reduce(sq, group=meshes[mesh_id].get_group(d))
            norms = sq.sqrt()
            scales = _agc.clip_scale(norms[:, 0], norms[:, 1], clip_factor, eps)
            for (_, g), scale in zip(pairs, scales.unbind()):
                g.copy_(g.to(acc) * scale)


def local_units(op: str, name: str, weight: torch.Tensor, grad: torch.Tensor):
    """(local weight, local grad, spans_ranks). Plain tensors pass through; for a DTensor the
    local shards, and spans_ranks is True when its single unit (ndim ≤ 1) is split across ranks."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(weight, dtensor):
        return weight, grad, False
    if not isinstance(grad, dtensor) or grad.placements != weight.placements:
        raise ValueError(f"{op}: {name}.grad must be a DTensor placed like {name} ({weight.placements})")
    for pl in weight.placements:
        if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)):
            raise ValueError(
                f"{op}: {name} has placement {pl}; unit-wise clipping supports Shard(0) and Replicate "
                "(FSDP2's fully_shard) only, since other placements split a unit across ranks"
            )
    spans_ranks = weight.dim() <= 1 and any(pl.is_shard() for pl in weight.placements)
    return weight.to_local(), grad.to_local(), spans_ranks


def layout_signature(tensors: Sequence[torch.Tensor | None]) -> tuple | None:
    """What a plan's validation and tables depend on, apart from addresses: shape, strides, dtype
    and device of each tensor (None for an absent one); None for tensors without strides (sparse),
    which only the full validation can name."""
    try:
        return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


class FusedLaunch:
    """One fused launch of a plan: the positions of its tensors in the plan's lists, its kernel
    set, and its ``UnitTable``."""

    __slots__ = ("backend", "indices", "table", "clip")

    def __init__(self, backend: str, indices: list[int], table: _agc.UnitTable, clip: bool = True):
        self.backend, self.indices, self.table, self.clip = backend, indices, table, clip

    def readdress(self, *operands: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """The first tensor of each operand (the kernel's base pointers), after pointing the table
        at the operands' current addresses; None when they cannot share the launch any more."""
        picked = [[tensors[i] for i in self.indices] for tensors in operands]
        if not self.table.readdress(picked):
            return None
        return tuple(tensors[0] for tensors in picked)


def fused_launches(op: str, backends: dict, groups: dict[tuple, list[int]],
                   *operands: Sequence[torch.Tensor]) -> list[FusedLaunch]:
    """A FusedLaunch per group of positions, keyed by (device, ...) as ``_agc.group_key`` makes
    them (which guarantees that the tensors of a group can share base pointers)."""
    launches = []
    for key, indices in groups.items():
        table = _agc.unit_table([[tensors[i] for i in indices] for tensors in operands])
        if table is None:
            raise RuntimeError(f"{op}: internal error: the tensors of a fused launch are not element-aligned")
        launches.append(FusedLaunch(backends[key[0]], indices, table))
    return launches


class _ClipPlan:
    """``agc_``'s validated work for one list of parameters: which run on the torch path, which in
    which fused launch (positions in that list). Reusable while the layouts of the parameters and
    their gradients, and the backend setting, stay; the addresses may change (new gradients after
    ``zero_grad(set_to_none=True)``), which only readdresses the fused launches' tables."""

    def __init__(self, backend_setting: str, layouts: tuple | None, torch_indices: list[int],
                 launches: list[FusedLaunch], sharded: ShardedWholeUnits):
        self.backend_setting = backend_setting
        self.layouts = layouts  # None: not reusable (DTensors: their local shards are new tensors every call)
        self.torch_indices = torch_indices
        self.launches = launches
        self.sharded = sharded

    def run(self, weights: Sequence, grads: Sequence, clip_factor: float, eps: float) -> bool:
        """Clip; False, with nothing written, when the fused launches must be regrouped first."""
        bases = [launch.readdress(grads, weights) for launch in self.launches]
        if any(b is None for b in bases):
            return False
        if self.torch_indices:
            _agc.agc_torch([weights[i] for i in self.torch_indices], [grads[i] for i in self.torch_indices],
                           clip_factor, eps)
        for launch, (g0, w0) in zip(self.launches, bases):
            (_agc.agc_triton if launch.backend == "triton" else _agc.agc_cuda)(launch.table, g0, w0, clip_factor, eps)
        if self.sharded.items:
            self.sharded.clip_(clip_factor, eps)
        return True


def _agc_plan(op: str, sequence: Sequence, params: list[torch.Tensor], backend_setting: str,
              layouts: tuple | None) -> tuple[_ClipPlan, tuple[list, list]]:
    """Validates every parameter and gradient (raising before anything is written) and sorts
    them into the torch path and fused launches: one per (device, gradient dtype and alignment,
    weight dtype and alignment), on the backend that runs the op on that device. Returns the plan
    and the (weights, grads) it was made for (local shards for DTensors), which the plan does not
    keep: a cached plan holding them would keep old gradients alive."""
    names = [name for name, _ in named_params(op, sequence)]
    weights: list = [None] * len(params)
    grads: list = [None] * len(params)
    torch_indices: list[int] = []
    groups: dict[tuple, list[int]] = {}
    backends: dict[torch.device, str] = {}
    sharded = ShardedWholeUnits()
    for index, (name, p) in enumerate(zip(names, params)):
        if p.grad is None:
            continue
        grad = check_param_and_grad(op, name, p, writes="grad")
        w, g, spans_ranks = local_units(op, name, p.detach(), grad.detach())
        if spans_ranks:
            sharded.add(p.detach(), grad.detach())
            continue
        if not g.numel():
            continue
        if g.device not in backends:
            backends[g.device] = _backend.resolve(op, g.device, supported=AGC_BACKENDS)
        weights[index], grads[index] = w, g
        if backends[g.device] == "torch" or not (_agc.has_dense_units(w) and _agc.has_dense_units(g)):
            torch_indices.append(index)  # any layout: the plain torch math
            continue
        groups.setdefault(_agc.group_key(g) + _agc.group_key(w)[1:], []).append(index)
    launches = fused_launches(op, backends, groups, grads, weights)
    plan = _ClipPlan(backend_setting, layouts if _all_local(params) else None, torch_indices, launches, sharded)
    return plan, (weights, grads)


def _all_local(params: list[torch.Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is None or not any(isinstance(p, dtensor) for p in params)


def _tensors(op: str, parameters: object) -> tuple[list, list[torch.Tensor]]:
    """(parameters as a re-iterable sequence, the distinct tensors in it). The common forms (a
    tensor, a list or iterable of tensors) take no per-item Python work beyond a type check;
    param groups go through ``named_params``."""
    if isinstance(parameters, torch.Tensor):
        return [parameters], [parameters]
    sequence = parameters
    if isinstance(parameters, Iterable) and not isinstance(parameters, (str, bytes, dict)):
        sequence = parameters if isinstance(parameters, (list, tuple)) else list(parameters)
        if all(isinstance(p, torch.Tensor) for p in sequence) and len(set(map(id, sequence))) == len(sequence):
            return sequence, list(sequence)
    return sequence, [p for _, p in named_params(op, sequence)]


# agc_'s plans, keyed by the identities of the parameters (a model, its EMA copy, eval clones...).
PLAN_CACHE_SIZE = 32
_agc_plans: collections.OrderedDict[tuple[int, ...], _ClipPlan] = collections.OrderedDict()


def check_clip_args(op: str, clip_factor: object, eps: object) -> tuple[float, float]:
    return check_float(op, "clip_factor", clip_factor, positive=True), check_float(op, "eps", eps, nonneg=True)


@torch.no_grad()
def agc_(parameters, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise Adaptive Gradient Clipping, in place on each parameter's ``.grad``.

    With units as in timm (ndim ≤ 1: the whole tensor; otherwise each slice along dim 0) and
    λ = clip_factor::

        ‖W_i‖* = max(‖W_i‖, eps)
        if not ‖G_i‖ < λ‖W_i‖*:   G_i ← G_i · λ‖W_i‖* / max(‖G_i‖, 1e-6)

    Equals timm's ``adaptive_clip_grad(parameters, clip_factor, eps)`` (Brock et al. 2021,
    §4.1) up to rounding, with norms accumulated in fp32 (fp64 for fp64). ``parameters`` is a
    tensor, an iterable of tensors or an iterable of param groups (dicts with "params");
    parameters whose ``.grad`` is None are skipped. Pass all parameters but the final
    classifier (``agc_parameters(model)``), as the paper does.

    On CUDA every unit of every parameter is clipped in one launch per (device, gradient dtype,
    weight dtype) group (a gradient may have another dtype than its parameter, as torch's
    ``grad_dtype`` allows), without host synchronisation, from a row table cached while the tensors stay the same, so
    a step can be captured in a CUDA graph after one eager step. Non-finite gradients: a unit
    holding NaN (in G_i or W_i) becomes all-NaN and a unit with ‖G_i‖ = inf is scaled by 0
    (its infinite entries become NaN), exactly as in timm; finite units are unaffected. A gradient
    whose elements share memory (an ``expand``-ed one) cannot be clipped in place: ValueError,
    raised before any gradient is written, like every other argument error.
    DistributedDataParallel: call after backward (gradients are already averaged). FSDP2
    (``fully_shard``, Shard(0) DTensors): rows stay local; whole-tensor units sum their squared
    norms across ranks with one all_reduce per mesh group.
    """
    op = "agc_"
    clip_factor, eps = check_clip_args(op, clip_factor, eps)
    sequence, params = _tensors(op, parameters)
    backend_setting = _backend.get_backend()
    grads = [p.grad for p in params]
    layouts = layout_signature(params), layout_signature(grads)
    key = tuple(map(id, params))
    plan = _agc_plans.get(key)
    if plan is not None and plan.layouts == layouts and plan.backend_setting == backend_setting:
        _agc_plans.move_to_end(key)
        if plan.run(params, grads, clip_factor, eps):
            return
    plan, operands = _agc_plan(op, sequence, params, backend_setting, layouts)
    if plan.layouts is not None:
        _agc_plans[key] = plan
        while len(_agc_plans) > PLAN_CACHE_SIZE:
            _agc_plans.popitem(last=False)
    if not plan.run(*operands, clip_factor, eps):
        raise RuntimeError(f"{op}: internal error: a fresh plan's tables do not fit its tensors")


def agc_parameters(
    model: torch.nn.Module,
    exclude: Iterable[str] | Callable[[str, torch.nn.Parameter], bool] | None = None,
) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` to clip the paper's way: all but the final classifier.

    ``exclude`` is a list of names, each a parameter name or a module prefix ("head.fc" drops
    head.fc.weight and head.fc.bias), or a predicate ``(name, param) -> bool`` that is True for
    parameters to leave out. By default the classifier is ``model.get_classifier()`` when the
    model has one (timm models), else the last ``nn.Linear`` in ``model.modules()`` order.
    Parameters with ``requires_grad=False`` are left out.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"agc_parameters: model must be a torch.nn.Module; got {type(model).__name__}")
    if exclude is None:
        skip_ids = {id(p) for p in _classifier(model).parameters()}
        excluded = lambda name, p: id(p) in skip_ids  # noqa: E731
    elif callable(exclude):
        excluded = exclude
    elif isinstance(exclude, str):
        raise TypeError("agc_parameters: exclude must be a list of names, not a single str (write [name])")
    else:
        prefixes = tuple(exclude)
        for i, prefix in enumerate(prefixes):
            if not isinstance(prefix, str):
                raise TypeError(f"agc_parameters: exclude[{i}] must be a str; got {type(prefix).__name__}")
        excluded = lambda name, p: any(name == x or name.startswith(x + ".") for x in prefixes)  # noqa: E731
    return [p for name, p in model.named_parameters() if p.requires_grad and not excluded(name, p)]


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier) and isinstance(get_classifier(), torch.nn.Module):
        return get_classifier()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(
            "agc_parameters: model has no get_classifier() and no nn.Linear; name the classifier with exclude="
        )
    return linears[-1]
