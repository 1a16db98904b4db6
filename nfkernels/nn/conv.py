"""WSConv2d: a Conv2d whose weight is Scaled-Weight-Standardized on the fly (timm ScaledStdConv2d
and ScaledStdConv2dSame, same parameter names and shapes)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nfkernels.functional import EPS_MODES, weight_standardize


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
        needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad)
        if not self._freeze_requested or needs_grad:
            return self._standardize(out_dtype)
        return self._frozen_weight(out_dtype)

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
