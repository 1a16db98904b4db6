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

    When no gradient is needed (eval, ``torch.no_grad``, frozen weights) the standardized weight is
    cached and recomputed only when ``weight`` or ``gain`` change: in-place updates, optimizer
    steps and ``load_state_dict`` are noticed (they bump the tensors' version counters); edits
    through ``.data`` bypass those counters and are not (call ``clear_cache()`` after them).
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
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None

    def _cache_key(self, out_dtype: torch.dtype | None) -> tuple:
        w, g = self.weight, self.gain
        return (w._version, g._version, w.data_ptr(), g.data_ptr(), w.dtype, w.device, w.stride(), out_dtype)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast would cast this conv's float32 weight to, or None outside autocast."""
        device_type = self.weight.device.type
        # is_autocast_enabled raises for device types autocast does not know (meta).
        if (self.weight.dtype == torch.float32 and torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type)):
            return torch.get_autocast_dtype(device_type)
        return None

    def standardized_weight(self) -> torch.Tensor:
        """Ŵ for the current weight and gain (cached while no gradient is needed).

        Under autocast Ŵ is written directly in the autocast dtype from fp32 statistics, so the conv
        does not cast it again (one write of Ŵ instead of a write and a cast); its gradient reaches
        weight and gain in their own dtype."""
        out_dtype = self._autocast_dtype()
        needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad)
        if needs_grad:
            self._cached_weight = None
            return weight_standardize(self.weight, self.gain, gamma=self.gamma, eps=self.eps,
                                      eps_mode=self.eps_mode, out_dtype=out_dtype)
        if torch.compiler.is_compiling():  # a compiled graph recomputes it; data_ptr() cannot be traced
            return weight_standardize(self.weight, self.gain, gamma=self.gamma, eps=self.eps,
                                      eps_mode=self.eps_mode, out_dtype=out_dtype)
        # An inference tensor must not be reused outside inference mode (it cannot be saved for a
        # backward through the input), so the mode is part of the key.
        key = self._cache_key(out_dtype) + (torch.is_inference_mode_enabled(),)
        if self._cached_weight is None or self._cached_weight[0] != key:
            with torch.no_grad():
                w = weight_standardize(self.weight, self.gain, gamma=self.gamma, eps=self.eps,
                                       eps_mode=self.eps_mode, out_dtype=out_dtype)
            self._cached_weight = (key, w)
        return self._cached_weight[1]

    def clear_cache(self) -> None:
        """Drop the cached standardized weight (needed only after edits through ``.data``)."""
        self._cached_weight = None

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
        return s + (", padding=same (dynamic)" if self.same_pad else "")
