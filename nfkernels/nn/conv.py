"""WSConv2d: a Conv2d whose weight is Scaled-Weight-Standardized on the fly (timm ScaledStdConv2d
and ScaledStdConv2dSame, same parameter names and shapes), and the batched standardization of all
of a model's WSConv2d (``begin_batched_standardization``, ``batch_weight_standardization``)."""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import noop_context_fn

from nfkernels.functional import EPS_MODES, _resolve, weight_standardize
from nfkernels.ops.weight_standardize import weight_standardize_batched


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def symmetric_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's get_padding: the symmetric padding that keeps 'same'-ish output for odd kernels."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def same_padding_amount(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's 'SAME' adds along one dim (split low = total // 2, high = rest)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


def pad_same(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """Pad the last two dims of ``x`` the way TensorFlow's 'SAME' does (may be asymmetric)."""
    ph = same_padding_amount(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    pw = same_padding_amount(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class WSConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021, §3; timm ScaledStdConv2d).

    The conv uses Ŵ = (W − μ) / sqrt(σ² + eps) · gain · gamma / sqrt(fan_in) (``eps_mode="timm"``,
    or DeepMind's form with ``eps_mode="deepmind"``), computed by one fused kernel per call.
    ``padding=None`` pads symmetrically like timm; ``padding="same"`` pads like TensorFlow:
    statically when that is symmetric, otherwise per input size (timm ScaledStdConv2dSame).

    By default Ŵ is recomputed on every call, as timm does: one fused kernel, and the output can
    never lag behind the weight, whatever edits it (optimizers, ``load_state_dict``, EMA or pruning
    through ``.data``). Inference that wants to skip that kernel opts in with
    ``freeze_standardized_weight()`` (or ``nfkernels.nn.freeze_standardized_weights(model)``),
    which stores Ŵ once; see there for what a frozen conv does when the weight changes.

    Inside a model that standardizes its convs together (``NFNet``, models converted by
    ``nfkernels.convert``, ``batch_weight_standardization``), a call during the model's forward
    uses the Ŵ the model computed for all its convs at the start of that forward, in one launch
    (and their gradients in one launch); everywhere else the conv computes its own.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=True, gamma=1.0, eps=1e-5, gain_init=1.0, eps_mode="timm"):
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        dynamic_same = False
        if isinstance(padding, str):
            if padding.lower() != "same":
                raise ValueError(f"WSConv2d: padding must be None, an int/tuple or 'same'; got {padding!r}")
            static = all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(kernel_size, stride, dilation))
            dynamic_same = not static
            padding = 0 if dynamic_same else tuple(
                symmetric_padding(k, s, d) for k, s, d in zip(kernel_size, stride, dilation))
        elif padding is None:
            padding = tuple(symmetric_padding(k, s, d) for k, s, d in zip(kernel_size, stride, dilation))
        if eps_mode not in EPS_MODES:
            raise ValueError(f"WSConv2d: eps_mode must be one of {EPS_MODES}; got {eps_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain_init)))
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.eps_mode = eps_mode
        self.same_pad = dynamic_same
        self._freeze_requested = False
        # (weight/gain identity when Ŵ was frozen, {dtype: Ŵ}); derived data, never saved (__getstate__).
        self._frozen: tuple[tuple, dict[torch.dtype, torch.Tensor]] | None = None

    def __getstate__(self):
        # Ŵ is as large as the weight and recomputable from it: pickling it would double the size
        # of torch.save(model) and of copy.deepcopy. The copy stays frozen and recomputes Ŵ from
        # its own (saved) weight when it is first used.
        state = super().__getstate__()
        state["_frozen"] = None
        return state

    def __setstate__(self, state):
        # Models saved before freezing was explicit carry the old implicit cache: drop it.
        state = dict(state)
        state.pop("_cached_weight", None)
        state.setdefault("_freeze_requested", False)
        state.setdefault("_frozen", None)
        super().__setstate__(state)

    def _weight_identity(self) -> tuple:
        """What changes when weight or gain is edited in place, replaced, moved or cast (not when it
        is edited through ``.data``, which bypasses the version counters)."""
        w, g = self.weight, self.gain
        return (w._version, g._version, w.data_ptr(), g.data_ptr(), w.dtype, w.device, w.stride(),
                g.dtype, g.device)

    def _standardize(self, out_dtype: torch.dtype | None) -> torch.Tensor:
        return weight_standardize(self.weight, self.gain, gamma=self.gamma, eps=self.eps,
                                  eps_mode=self.eps_mode, out_dtype=out_dtype)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast would cast this conv's float32 weight to, or None outside autocast."""
        device_type = self.weight.device.type
        # is_autocast_enabled raises for device types autocast does not know (meta).
        if (self.weight.dtype == torch.float32 and torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type)):
            return torch.get_autocast_dtype(device_type)
        return None

    def standardized_weight(self) -> torch.Tensor:
        """Ŵ for the current weight and gain, or the frozen Ŵ (see ``freeze_standardized_weight``).

        Under autocast Ŵ is written directly in the autocast dtype from fp32 statistics, so the conv
        does not cast it again (one write of Ŵ instead of a write and a cast); its gradient reaches
        weight and gain in their own dtype."""
        out_dtype = self._autocast_dtype()
        if self._freeze_requested and not self._needs_grad():
            return self._frozen_weight(out_dtype)
        # Dynamo cannot trace the ContextVar; a compiled model standardizes conv by conv.
        batch = None if torch.compiler.is_compiling() else _batch.get()
        if batch is not None:
            w_hat = batch.get(self)
            # Another dtype: autocast was entered or left inside the model's forward.
            if w_hat is not None and w_hat.dtype == (out_dtype or self.weight.dtype):
                return w_hat
        return self._standardize(out_dtype)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad)

    def _frozen_weight(self, out_dtype: torch.dtype | None) -> torch.Tensor:
        dtype = out_dtype or self.weight.dtype
        if torch.compiler.is_compiling():
            # The identity check cannot be traced (data_ptr); a compiled graph uses the frozen Ŵ
            # as it is, or computes Ŵ itself when none is stored for this dtype yet.
            frozen = self._frozen[1].get(dtype) if self._frozen is not None else None
            return frozen if frozen is not None else self._standardize(out_dtype)
        if self._frozen is None:  # frozen, then copied or unpickled: Ŵ of the weight it came with
            self._store_frozen()
        elif self._frozen[0] != self._weight_identity():
            raise RuntimeError(
                "WSConv2d: weight or gain changed (in place, replaced, moved or cast) after "
                "freeze_standardized_weight(), so the frozen standardized weight is stale; call "
                "freeze_standardized_weight() again after changing them, or "
                "unfreeze_standardized_weight() to recompute it on every call")
        cache = self._frozen[1]
        if dtype not in cache:  # autocast: the compute-dtype copy, rounded once from the frozen Ŵ
            with torch.no_grad(), torch.inference_mode(False):
                cache[dtype] = cache[self.weight.dtype].to(dtype)
        return cache[dtype]

    def _store_frozen(self) -> None:
        # Outside inference mode: an inference tensor could not be saved for a backward through
        # the input (frozen parameters, gradient for x) once inference mode is left.
        with torch.no_grad(), torch.inference_mode(False):
            w = self._standardize(None)
        self._frozen = (self._weight_identity(), {w.dtype: w})

    def freeze_standardized_weight(self) -> "WSConv2d":
        """Compute Ŵ now and reuse it, instead of recomputing it, whenever no gradient is needed.

        For inference: it saves one kernel per conv per call, for the memory of a second copy of
        the weight (plus one in the autocast dtype, made on first use under autocast). Calling it
        again recomputes Ŵ from the current weight. While frozen:

        * a forward that needs gradients for weight or gain (grad mode on and either requiring
          grad) recomputes Ŵ, as an unfrozen conv does, so training stays correct; the frozen Ŵ
          cannot carry gradients to the parameters;
        * if weight or gain has been changed in place (optimizer step, ``load_state_dict``),
          replaced, moved or cast (``model.to``) since freezing, using the frozen Ŵ raises
          RuntimeError instead of returning a stale output; edits through ``.data`` bypass the
          version counters and cannot be seen: freeze again after them;
        * ``state_dict``, ``torch.save(model)`` and ``copy.deepcopy`` do not store Ŵ: a copy is
          frozen too and recomputes Ŵ from its own weight on first use;
        * a compiled graph uses the frozen Ŵ without the change check (it cannot be traced).

        Returns the conv, for chaining."""
        self._freeze_requested = True
        self._store_frozen()
        return self

    def unfreeze_standardized_weight(self) -> "WSConv2d":
        """Drop the frozen Ŵ and go back to recomputing it on every call (the default)."""
        self._freeze_requested = False
        self._frozen = None
        return self

    @property
    def standardized_weight_frozen(self) -> bool:
        """Whether ``freeze_standardized_weight`` is in effect."""
        return self._freeze_requested

    def conv(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution with the standardized weight and the given bias (None: no bias, so that
        a caller can fold ``self.bias`` into the next fused kernel)."""
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.bias)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}, eps_mode={self.eps_mode}"
        s += ", padding=same (dynamic)" if self.same_pad else ""
        return s + (", standardized_weight=frozen" if self._freeze_requested else "")


def _ws_convs(fn: str, model: nn.Module) -> list[WSConv2d]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module; got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, WSConv2d)]


def freeze_standardized_weights(model: nn.Module) -> int:
    """``freeze_standardized_weight()`` on every WSConv2d in ``model`` (itself included): for
    inference, so that no call recomputes a standardized weight. Returns how many were frozen, so
    that 0 (a model without WSConv2d, e.g. a timm model not yet converted) shows."""
    convs = _ws_convs("freeze_standardized_weights", model)
    for conv in convs:
        conv.freeze_standardized_weight()
    return len(convs)


def unfreeze_standardized_weights(model: nn.Module) -> int:
    """Undo ``freeze_standardized_weights``: every WSConv2d in ``model`` recomputes Ŵ on each call
    again (needed before training it). Returns how many WSConv2d were frozen before."""
    convs = _ws_convs("unfreeze_standardized_weights", model)
    was_frozen = sum(conv.standardized_weight_frozen for conv in convs)
    for conv in convs:
        conv.unfreeze_standardized_weight()
    return was_frozen


# ----------------------------------------------------------------------------- batched standardization

# {conv: Ŵ} computed together for the forward that is running (None outside one). A ContextVar,
# so that threads (and the autograd threads that recompute checkpointed regions) keep apart.
_batch: contextvars.ContextVar[dict[WSConv2d, torch.Tensor] | None] = contextvars.ContextVar(
    "nfkernels_ws_batch", default=None)

# Every submodule registration anywhere bumps this; a model's cached conv list is rebuilt when it
# moved, so that a forward does not walk the module tree. Removing a module (del, pop) registers
# nothing: a removed conv stays in the list, and is standardized (its Ŵ unused, its gradient 0)
# until the next registration anywhere.
_registrations = 0
_model_convs: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[WSConv2d]]] = weakref.WeakKeyDictionary()


def _count_registration(module, name, submodule) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _convs_of(model: nn.Module) -> list[WSConv2d]:
    cached = _model_convs.get(model)
    if cached is None or cached[0] != _registrations:
        cached = (_registrations, [m for m in model.modules() if isinstance(m, WSConv2d)])
        _model_convs[model] = cached
    return cached[1]


def _standardize_together(convs) -> dict[WSConv2d, torch.Tensor]:
    """{conv: Ŵ} for the convs that would compute Ŵ themselves now (frozen ones that need no
    gradient use their frozen Ŵ), one batched launch per (device, weight dtype, Ŵ dtype) where the
    backend is Triton; the torch and cuda backends (no batched kernel) are left conv by conv."""
    groups: dict[tuple, list] = {}
    for conv in convs:
        w, g = conv.weight, conv.gain
        if (conv._freeze_requested and not conv._needs_grad()) or w.numel() == 0 or conv.eps_mode not in EPS_MODES:
            continue  # frozen; empty, or an invalid mode: the conv's own call handles (or reports) it
        groups.setdefault((w.device, w.dtype), []).append((conv, w, g))
    batch = {}
    for (device, _), members in groups.items():
        if _resolve("weight_standardize", device) != "triton":
            continue
        group_convs, weights, gains = zip(*members)
        w_hats = weight_standardize_batched(
            weights, gains, [c.gamma for c in group_convs], [c.eps for c in group_convs],
            [c.eps_mode == "deepmind" for c in group_convs], group_convs[0]._autocast_dtype())
        batch.update(zip(group_convs, w_hats))
    return batch


def begin_batched_standardization(model: nn.Module) -> contextvars.Token | None:
    """Standardize every WSConv2d of ``model`` now, together, and let their calls use that Ŵ until
    ``end_batched_standardization(token)``: one launch forward (per device and dtype) instead of
    one per conv, and one backward once autograd has every Ŵ's gradient. For a model's forward::

        token = begin_batched_standardization(self)
        try:
            ...
        finally:
            end_batched_standardization(token)

    Returns None (and changes nothing) under torch.compile, where the convs standardize one by one,
    when no conv is left to batch, and when ``model.batched_standardization`` is False: the opt-out
    for models checkpointed from outside (``checkpoint_wrapper``, whose recomputation would not see
    the batch) and for DistributedDataParallel runs that want each conv's gradient as soon as it
    exists (batched, every conv weight's gradient arrives at the end of the backward). Convs already in an enclosing batch keep its Ŵ. A part of
    the forward run under torch.utils.checkpoint must be recomputed with the batch active: pass
    ``context_fn=batched_checkpoint_context()`` (use_reentrant=False)."""
    if torch.compiler.is_compiling() or not getattr(model, "batched_standardization", True):
        return None
    outer = _batch.get()
    convs = _convs_of(model) if outer is None else [c for c in _convs_of(model) if c not in outer]
    batch = _standardize_together(convs)
    if not batch:
        return None
    return _batch.set({**outer, **batch} if outer else batch)


def end_batched_standardization(token: contextvars.Token | None) -> None:
    """Close what ``begin_batched_standardization`` returned ``token`` for (None: nothing)."""
    if token is not None:
        _batch.reset(token)


@contextlib.contextmanager
def _batch_active(batch: dict[WSConv2d, torch.Tensor]):
    token = _batch.set(batch)
    try:
        yield
    finally:
        _batch.reset(token)


def batched_checkpoint_context():
    """``context_fn`` for torch.utils.checkpoint (use_reentrant=False) inside a batched forward:
    the recomputation in backward (on another thread, outside the forward) uses the same Ŵ, so that
    it saves the same tensors as the first run did."""
    batch = None if torch.compiler.is_compiling() else _batch.get()
    if batch is None:
        return noop_context_fn
    return lambda: (contextlib.nullcontext(), _batch_active(batch))


_hook_tokens = threading.local()


def _begin_hook(model: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    tokens = _hook_tokens.__dict__.setdefault("stack", [])
    tokens.append(None)  # first, so that the post-hook (always called) pops even if this raises
    # timm's checkpoint_seq recomputes stages without this batch: those models go conv by conv.
    if not (getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled()):
        tokens[-1] = begin_batched_standardization(model)


def _end_hook(model: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        return
    end_batched_standardization(_hook_tokens.stack.pop())


def batch_weight_standardization(model: nn.Module) -> nn.Module:
    """Make every call of ``model`` standardize all its WSConv2d together (one launch forward per
    device and dtype, one backward), through forward hooks; ``nfkernels.convert`` does this for
    the models it converts. Calling it again changes nothing. Returns the model.

    Not for models that checkpoint parts of their forward from outside (e.g. torch's
    ``checkpoint_wrapper`` around blocks): their recomputation in backward would standardize conv
    by conv and save other tensors than the first run (a CheckpointError); set
    ``model.batched_standardization = False`` for those. A ``grad_checkpointing`` attribute
    (timm's) is honoured: while it is true, training forwards go conv by conv."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"batch_weight_standardization: model must be an nn.Module; got {type(model).__name__}")
    if _begin_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_begin_hook)
        model.register_forward_hook(_end_hook, always_call=True)
    return model
