"""``SGD_AGC``: the NFNet paper's optimizer (SGD with Nesterov momentum and unit-wise AGC),
fused into one pass per unit row (nfkernels.ops.sgd_agc)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from nfkernels import _backend
from nfkernels._checks import check_float
from nfkernels.clip import (AGC_BACKENDS, FusedLaunch, ShardedWholeUnits, check_param_and_grad, fused_launches,
                            layout_signature, local_units)
from nfkernels.ops import agc as _agc
from nfkernels.ops import sgd_agc as _ops
from nfkernels.ops._utils import same_layout

OP = "SGD_AGC"


class SGD_AGC(torch.optim.Optimizer):  # noqa: N801 (the name is fixed by the public API)
    """torch.optim.SGD (no dampening) with unit-wise Adaptive Gradient Clipping applied first.

    Per parameter, with s the AGC factor of each unit (``nfkernels.agc_``)::

        g ← s·g;  g ← g + weight_decay·p;  buf ← momentum·buf + g  (buf ← g on the first step)
        nesterov: g ← g + momentum·buf, else g ← buf;  p ← p − lr·g

    Param-group options beyond torch's: ``clip_factor``, ``eps`` and ``clipping`` (False turns
    AGC off for the group, e.g. the final classifier); ``weight_decay=0`` turns decay off (the
    paper: none on gains, biases and SkipInit gains). ``nfkernels.optim.nfnet_param_groups``
    builds the paper's groups. On CUDA one launch per (param group, device, dtypes) reads p, g
    and buf once and writes p and buf once; ``.grad`` is not modified. Momentum buffers live in
    ``state[p]["momentum_buffer"]`` as in torch.optim.SGD, so state dicts save, load and
    interchange with it (buffers take the parameter's dtype; a gradient may have another, as
    torch's ``grad_dtype`` allows). Each parameter may be listed once; ``step()`` validates every
    group before it updates any, and keeps what it validated (a plan per group: which parameters
    share which launch, and the launch's row table) while the parameters, their gradients' and
    buffers' layouts and the backend setting stay the same, so a step costs the host little more
    than its launches. The gradients may be new tensors every step (``zero_grad()``'s default
    ``set_to_none=True``): only a small table of their addresses is rebuilt; with
    ``zero_grad(set_to_none=False)`` they are zeroed by one ``torch._foreach_zero_`` per
    (device, dtype). On CPU the torch reference runs. Under FSDP2, the gradients of
    sharded whole-tensor units (biases, gains) are clipped in place before the fused step,
    because their norms need an all_reduce.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 clip_factor: float = 0.01, eps: float = 1e-3, *, clipping: bool = True):
        # foreach: torch.optim's zero_grad(set_to_none=False) then zeroes the gradients with one
        # torch._foreach_zero_ per (device, dtype) instead of one zero_ per parameter.
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        clip_factor=clip_factor, eps=eps, clipping=clipping, foreach=True)
        _check_group_options(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            _check_group_options(self.param_groups[index], f"param_groups[{index}]")
            _check_unique(self.param_groups[index]["params"], index)
        except (TypeError, ValueError):
            # An invalid group must not stay behind for step() to use.
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A torch.optim.SGD state dict lacks the AGC options; it loads with the defaults.
        for group in self.param_groups:
            group.setdefault("clip_factor", 0.01)
            group.setdefault("eps", 1e-3)
            group.setdefault("clipping", True)
            group.setdefault("nesterov", False)
            # torch.optim.SGD options SGD_AGC does not implement must not be dropped silently.
            if group.get("dampening", 0) != 0 or group.get("maximize", False):
                raise ValueError(f"{OP}: the state dict's param group uses dampening="
                                 f"{group.get('dampening', 0)}, maximize={group.get('maximize', False)}, "
                                 "which SGD_AGC does not implement (only dampening=0, maximize=False)")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any is updated: a bad gradient in a later group must
        # not leave the earlier groups stepped.
        backend_setting = _backend.get_backend()
        runs = [self._ready_plan(i, group, backend_setting) for i, group in enumerate(self.param_groups)]
        for group, (plan, operands, bases) in zip(self.param_groups, runs):
            plan.run(group, operands, bases)
        return loss

    def _operands(self, params: list) -> tuple[list, list, list]:
        """(params, their gradients, their momentum buffers or None) as they are now."""
        state = self.state
        bufs = []
        for p in params:
            entry = state.get(p)  # not state[p]: that would add empty entries to the state dict
            bufs.append(entry.get("momentum_buffer") if entry else None)
        return params, [p.grad for p in params], bufs

    def _ready_plan(self, index: int, group: dict, backend_setting: str):
        """(plan, operands, base tensors of its fused launches) for one group, validated: the kept
        plan when nothing but addresses changed since it was made, else a new one."""
        # Options may have been edited since add_param_group (schedulers write lr): a NaN or a
        # negative value would silently ruin every parameter.
        _check_group_options(group, f"param_groups[{index}]")
        plans = self.__dict__.setdefault("_plans", {})
        params = group["params"]
        operands = self._operands(params)
        key = _plan_key(group, operands, backend_setting)
        plan = plans.get(index)
        if plan is not None and plan.key == key:
            bases = plan.readdress(operands)
            if bases is not None:
                return plan, operands, bases
        plan = self._plan_group(index, group)
        if plan.operands is None:  # reusable: keyed on the operands as they are after planning (new buffers)
            operands = self._operands(params)
            plan.key = _plan_key(group, operands, backend_setting)
            plans[index] = plan
        else:
            operands = plan.operands
        return plan, operands, plan.readdress(operands)

    def _plan_group(self, index: int, group: dict) -> "_GroupPlan":
        """Validates the group's parameters and sorts them into the torch path and fused launches;
        writes nothing but missing momentum buffers (zeros, which the first step treats as absent)."""
        momentum = group["momentum"]
        params = group["params"]
        n = len(params)
        ws: list = [None] * n
        gs: list = [None] * n
        bs: list = [None] * n
        clips = [group["clipping"]] * n
        unfused: list[int] = []
        groups: dict[tuple, list[int]] = {}
        backends: dict[torch.device, str] = {}
        plan = _GroupPlan()
        local = True
        for j, p in enumerate(params):
            if p.grad is None:
                continue
            name = f"param_groups[{index}]['params'][{j}]"
            grad = check_param_and_grad(OP, name, p, writes="param")
            w, g, spans_ranks = local_units(OP, name, p, grad)
            local = local and w is p
            if clips[j] and spans_ranks:
                plan.sharded.add(p, grad)
                clips[j] = False
            state = self.state[p]
            buf = state.get("momentum_buffer") if momentum != 0 else None
            if momentum != 0 and buf is None:
                # Zero-filled, m·0 + g = g is torch's first-step rule, and every step runs the same
                # kernel (a capture after one eager step compiles nothing new).
                buf = torch.zeros_like(p)
                state["momentum_buffer"] = buf
            elif buf is not None:
                buf = _aligned_buffer(name, p, buf, state)
            if w.numel() == 0:
                continue
            ws[j], gs[j] = w, g
            bs[j] = (buf.to_local() if w is not p else buf) if buf is not None else w
            if w.device not in backends:
                backends[w.device] = _backend.resolve(OP, w.device, supported=AGC_BACKENDS)
            # The fused kernel reads element k of each row of p, g and buf as one element: their
            # layouts must agree. Any other layout takes the torch path.
            if (backends[w.device] == "torch" or not _agc.has_dense_units(w) or not same_layout(g, w)
                    or not same_layout(bs[j], w)):
                unfused.append(j)
                continue
            # Offsets count elements of each operand's first tensor: one dtype and one alignment
            # per operand within a launch (the gradient's dtype may differ from p's).
            key = (w.device, clips[j]) + _agc.group_key(w)[1:] + _agc.group_key(g)[1:] + _agc.group_key(bs[j])[2:]
            groups.setdefault(key, []).append(j)
        plan.unfused = [(j, clips[j]) for j in unfused]
        plan.launches = fused_launches(OP, backends, groups, ws, gs, bs)
        for launch, key in zip(plan.launches, groups):
            launch.clip = key[1]
        plan.momentum = momentum != 0
        plan.operands = None if local else (ws, gs, bs)
        return plan


def _plan_key(group: dict, operands: tuple[list, list, list], backend_setting: str) -> tuple:
    """What a group's plan depends on besides addresses (which its launches readdress)."""
    params, grads, bufs = operands
    return (tuple(map(id, params)), layout_signature(params), layout_signature(grads), layout_signature(bufs),
            group["momentum"] != 0, group["clipping"], backend_setting)


class _GroupPlan:
    """One param group's step, validated: sharded whole units to clip across ranks first, then
    positions for the torch path and fused launches. ``operands`` holds the (param, grad, buffer)
    lists of a plan that is not reusable (DTensors: local shards are new tensors every step)."""

    def __init__(self):
        self.sharded = ShardedWholeUnits()
        self.unfused: list[tuple[int, bool]] = []
        self.launches: list[FusedLaunch] = []
        self.momentum = False
        self.operands: tuple[list, list, list] | None = None
        self.key: tuple | None = None

    def readdress(self, operands: tuple[list, list, list]) -> list | None:
        """The base tensors of each fused launch, or None when the launches must be regrouped."""
        params, grads, bufs = operands
        if self.momentum:
            bases = [launch.readdress(params, grads, bufs) for launch in self.launches]
        else:  # no buffers: the parameters stand in for them, never written
            bases = [launch.readdress(params, grads, params) for launch in self.launches]
        return None if any(b is None for b in bases) else bases

    def run(self, group: dict, operands: tuple[list, list, list], bases: list) -> None:
        hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                     nesterov=group["nesterov"], clip_factor=group["clip_factor"], eps=group["eps"])
        params, grads, bufs = operands
        if self.sharded.items:  # before any update: these units' norms need the other ranks' shards
            self.sharded.clip_(group["clip_factor"], group["eps"])
        for j, clip in self.unfused:
            _ops.sgd_agc_torch(params[j], grads[j], bufs[j] if self.momentum else None, clip=clip, **hyper)
        for launch, (p0, g0, b0) in zip(self.launches, bases):
            _ops.sgd_agc_fused(launch.backend, launch.table, p0, g0, b0, clip=launch.clip, **hyper)


def _aligned_buffer(name: str, p: torch.Tensor, buf: torch.Tensor, state: dict) -> torch.Tensor:
    """The momentum buffer laid out like ``p`` (a loaded state dict may carry other strides)."""
    if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        raise ValueError(
            f"{OP}: the momentum buffer of {name} has shape {tuple(buf.shape)}, {buf.dtype} on {buf.device}; "
            f"expected {tuple(p.shape)}, {p.dtype} on {p.device} (a state dict of another model?)"
        )
    if not same_layout(buf, p):
        buf = torch.empty_like(p).copy_(buf)
        state["momentum_buffer"] = buf
    return buf


def _check_unique(params: list, index: int) -> None:
    """A parameter listed twice would be stepped twice, by two programs racing on its memory
    (torch.optim.SGD warns that this will become an error)."""
    first: dict[int, int] = {}
    for j, p in enumerate(params):
        if id(p) in first:
            raise ValueError(
                f"{OP}: param_groups[{index}]['params'][{j}] is the same tensor as "
                f"param_groups[{index}]['params'][{first[id(p)]}]; list each parameter once"
            )
        first[id(p)] = j


def _check_group_options(group: dict, where: str) -> None:
    at = f" ({where})" if where else ""
    check_float(OP, f"lr{at}", group["lr"], nonneg=True)
    momentum = check_float(OP, f"momentum{at}", group["momentum"], nonneg=True)
    check_float(OP, f"weight_decay{at}", group["weight_decay"], nonneg=True)
    check_float(OP, f"clip_factor{at}", group["clip_factor"], positive=True)
    check_float(OP, f"eps{at}", group["eps"], nonneg=True)
    for flag in ("nesterov", "clipping"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{OP}: {flag}{at} must be a bool; got {type(group[flag]).__name__}")
    if group["nesterov"] and momentum == 0:
        raise ValueError(f"{OP}: nesterov{at} needs momentum > 0 (as torch.optim.SGD)")


def nfnet_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_clip: Iterable[str] = ("head.fc",),
) -> list[dict]:
    """The paper's param groups for ``model`` (Brock et al. 2021, §4.1 and Appendix):
    weight decay on weights only (not on gains, biases or SkipInit gains: ndim ≤ 1 or a name
    ending in "gain"), no clipping on the modules or parameters named in ``no_clip`` (the
    final classifier). Empty groups are left out."""
    prefixes = tuple(no_clip)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() > 1 and not name.endswith("gain")
        clip = not any(name == x or name.startswith(x + ".") for x in prefixes)
        groups.setdefault((decay, clip), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "clipping": clip}
        for (decay, clip), params in groups.items()
    ]
