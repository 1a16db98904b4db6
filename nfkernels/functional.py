"""The public functional API (docs/design.md §4): validate arguments, pick a backend, call the op."""
from __future__ import annotations

import torch

from nfkernels import _backend
from nfkernels._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_float,
    check_numel,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from nfkernels.ops import weight_standardize as _ws
from nfkernels.ops import scaled_act as _sa
from nfkernels.ops import se_gate as _se

EPS_MODES = ("timm", "deepmind")
LOW_PRECISION = (torch.float16, torch.bfloat16)


# Every op of this module has all three implementations.
BACKENDS = ("torch", "triton", "cuda")


@torch.compiler.assume_constant_result
def _resolve_while_tracing(op: str, device: torch.device) -> str:
    return _backend.resolve(op, device, supported=BACKENDS)


def _resolve(op: str, device: torch.device) -> str:
    """``_backend.resolve``, callable inside torch.compile(fullgraph=True): dynamo cannot trace the
    ContextVar behind ``use_backend``, so while compiling the choice is evaluated once at trace
    time and baked into the graph as a constant (errors for unavailable backends still raise).
    A compiled function therefore keeps the backend it was traced with; ``torch.compiler.reset()``
    after changing backends retraces it.

    Meta tensors (models built under ``torch.device("meta")``: FSDP2's deferred init, FLOP
    counters, shape inference) take the torch path whatever the backend: they hold no data for a
    kernel to read, and every backend gives outputs of the same shapes and dtypes."""
    if device.type == "meta":
        return "torch"
    if torch.compiler.is_compiling():
        return _resolve_while_tracing(op, device)
    return _backend.resolve(op, device, supported=BACKENDS)


def _check_param_dtypes(op: str, act_name: str, act: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Per-channel parameters have the activation's dtype, or are float32 next to float16/bfloat16
    activations: the autocast case, where convs return low-precision activations but parameters
    stay float32. The ops compute in fp32 either way (they upcast every operand), so no parameter
    is rounded to the activation dtype, and each gradient comes back in its parameter's dtype."""
    for name, t in params.items():
        if t is None or t.dtype == act.dtype:
            continue
        if t.dtype == torch.float32 and act.dtype in LOW_PRECISION:
            continue
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but {act_name} has {act.dtype}; they must match "
            f"(or {name} be float32 with float16/bfloat16 {act_name}, as under autocast)"
        )


def weight_standardize(
    weight: torch.Tensor,
    gain: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    eps: float = 1e-5,
    eps_mode: str = "timm",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled Weight Standardization of a conv or linear weight, one unit per output row.

    ``weight`` has shape (O, ...) with N = weight[0].numel() (the fan-in); ``gain`` is optional
    with O elements (timm's shape is (O, 1, 1, 1)). With μ, σ² the per-row mean and biased
    variance::

        eps_mode="timm":      Ŵ = (W − μ) / sqrt(σ² + eps) · gain · gamma / sqrt(N)
        eps_mode="deepmind":  Ŵ = (W − μ) · gain · gamma / sqrt(max(N·σ², eps))

    "timm" matches timm's ScaledStdConv2d (NFNets use eps=1e-5) and is needed for timm weights;
    "deepmind" matches the official JAX code (which uses eps=1e-4). Statistics are computed in
    fp32 (fp64 for fp64 weights); the result has weight's shape and memory layout and dtype
    ``out_dtype`` (None: weight's dtype). Under autocast, pass the autocast dtype so that Ŵ is
    written once in the compute dtype from fp32 statistics (WSConv2d does). Differentiable with
    respect to weight and gain; their gradients come back in their own dtypes. An empty weight
    (O = 0 or N = 0) gives an empty Ŵ, on which nothing depends: both gradients are zeros.
    """
    op = "weight_standardize"
    check_tensor(op, "weight", weight, min_ndim=2)
    check_optional_tensor(op, "gain", gain)
    check_numel(op, "gain", gain, weight.shape[0], "one per output unit, weight.shape[0]")
    check_same_device(op, weight=weight, gain=gain)
    check_same_dtype(op, weight=weight, gain=gain)
    gamma = check_float(op, "gamma", gamma)
    eps = check_float(op, "eps", eps, positive=True)
    deepmind = check_choice(op, "eps_mode", eps_mode, EPS_MODES) == "deepmind"
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or one of {FLOAT_DTYPES}; got {out_dtype!r}")
    backend = _resolve(op, weight.device)
    if weight.numel() == 0:
        return _ws.weight_standardize_empty(weight, gain, out_dtype)
    if backend == "torch":
        return _ws.weight_standardize_torch(weight, gain, gamma, eps, deepmind, out_dtype)
    if backend == "cuda":
        return _ws.weight_standardize_cuda(weight, gain, gamma, eps, deepmind, out_dtype)
    return _ws.weight_standardize_triton(weight, gain, gamma, eps, deepmind, out_dtype)


# ----------------------------------------------------------------------------- squeeze-excite gate


def _check_fc_weight(op: str, name: str, weight: torch.Tensor, shape: tuple[int | None, int]) -> int:
    """A 1x1-conv weight (O, I, 1, 1) or a linear weight (O, I) matching ``shape`` (None: any O)."""
    check_tensor(op, name, weight)
    is_matrix = weight.dim() == 2 or (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1))
    out_ok = shape[0] is None or weight.shape[0] == shape[0]
    if not is_matrix or not out_ok or weight.shape[1] != shape[1]:
        want = f"({'rd' if shape[0] is None else shape[0]}, {shape[1]})"
        raise ValueError(
            f"{op}: {name} must have shape {want} or {want[:-1]}, 1, 1) (a 1x1 conv weight); "
            f"got {tuple(weight.shape)}"
        )
    return weight.shape[0]


def _check_eca_weight(op: str, weight: torch.Tensor) -> None:
    """ECA's conv weight: nn.Conv1d(1, 1, k, bias=False)'s (1, 1, k), or (k,); k odd (padding
    (k − 1)/2 keeps the C channels, as timm's EcaModule)."""
    check_tensor(op, "eca_weight", weight)
    if not (weight.dim() == 1 or (weight.dim() == 3 and tuple(weight.shape[:2]) == (1, 1))):
        raise ValueError(
            f"{op}: eca_weight must have shape (1, 1, k) (an nn.Conv1d(1, 1, k) weight) or (k,); "
            f"got {tuple(weight.shape)}"
        )
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(
            f"{op}: eca_weight must have an odd kernel size k >= 1 (zero padding (k - 1) // 2 on "
            f"each side keeps the C channels); got k = {k}"
        )


def se_gate_residual(
    h: torch.Tensor,
    shortcut: torch.Tensor | None,
    fc1_weight: torch.Tensor | None = None,
    fc1_bias: torch.Tensor | None = None,
    fc2_weight: torch.Tensor | None = None,
    fc2_bias: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shortcut_bias: torch.Tensor | None = None,
    skip_gain: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    alpha: float = 0.2,
    attn_gain: float = 2.0,
    eca_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squeeze-excite gate with the SkipInit residual: the tail of timm's NormFreeBlock
    (``attn_last=SEModule`` or ``EcaModule``, drop_path, ``skipinit_gain``, ``alpha``) in one
    fused op.

    ``h`` (N, C, H, W) is conv3's output without its bias, ``bias`` that bias (C elements),
    ``shortcut`` the shortcut branch (same shape; ``shortcut_bias`` optional C elements; None
    gives the plain gated output, e.g. a standalone SE layer).
    With hb = h + bias, k = skip_gain (a 0-d parameter; 1 if None) and m = mask (per-sample
    stochastic-depth multipliers already scaled by 1/keep_prob; 1 if None; not differentiated)::

        p   = mean_hw hb
        g   = sigmoid(fc2(relu(fc1(p))))                     (timm SEModule, 1x1 convs with bias)
        out = shortcut + shortcut_bias + alpha · k · m_n · attn_gain · g · hb

    fc1_weight is (rd, C, 1, 1) or (rd, C), fc2_weight (C, rd, 1, 1) or (C, rd), fc1_bias rd and
    fc2_bias C elements (each optional).

    ``eca_weight`` instead (never with the SE weights) makes the attention ECA (timm EcaModule,
    as in eca_nfnet_l* and nf_ecaresnet*): its (1, 1, K) nn.Conv1d weight, or (K,), K odd (the
    kernel size, not the skip gain k; it may exceed C), convolves p over the channel axis with
    zero padding (K − 1) // 2 and no bias::

        g   = sigmoid(conv1d(p.view(N, 1, C), eca_weight, padding=(K - 1) // 2)).view(N, C)

    and out is as above, attn_gain included. Without either there is no attention and
    out = shortcut + shortcut_bias + alpha · k · m_n · hb (no attn_gain, no sigmoid). The pooling
    and the gate accumulate in fp32 (fp64 for fp64; the attention's (N, C) math too, even under
    autocast, and ECA's conv without TF32); the result has h's dtype and memory format
    (NCHW or channels_last). h and shortcut share a dtype; the parameters have it too, or are
    float32 next to float16/bfloat16 h (autocast), and get gradients in their own dtypes.
    Differentiable with respect to every tensor argument but mask.

    With H·W = 0 the output is empty and every gradient is exactly 0 (no output element depends on
    any input); p is then taken as 0 rather than torch's NaN mean of an empty map, which would
    turn the SE or ECA weights' zero gradients into 0·NaN = NaN.
    """
    op = "se_gate_residual"
    check_tensor(op, "h", h, ndim=4)
    check_optional_tensor(op, "shortcut", shortcut, ndim=4)
    if shortcut is not None and shortcut.shape != h.shape:
        raise ValueError(f"{op}: shortcut must have h's shape {tuple(h.shape)}; got {tuple(shortcut.shape)}")
    if shortcut is None and shortcut_bias is not None:
        raise ValueError(f"{op}: shortcut_bias was given without shortcut")
    n, c = h.shape[:2]
    if eca_weight is not None:
        se_given = [name for name, t in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
                                         ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)) if t is not None]
        if se_given:
            raise ValueError(
                f"{op}: eca_weight was given together with {', '.join(se_given)}; the attention is SE "
                f"(fc1/fc2 weights) or ECA (eca_weight), not both"
            )
        _check_eca_weight(op, eca_weight)
    if fc1_weight is None:
        for name, t in (("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)):
            if t is not None:
                raise ValueError(f"{op}: {name} was given without fc1_weight; pass all SE weights or none")
    else:
        if fc2_weight is None:
            raise ValueError(f"{op}: fc2_weight is required when fc1_weight is given")
        rd = _check_fc_weight(op, "fc1_weight", fc1_weight, (None, c))
        _check_fc_weight(op, "fc2_weight", fc2_weight, (c, rd))
        check_optional_tensor(op, "fc1_bias", fc1_bias)
        check_numel(op, "fc1_bias", fc1_bias, rd, "one per SE hidden unit, fc1_weight.shape[0]")
        check_optional_tensor(op, "fc2_bias", fc2_bias)
        check_numel(op, "fc2_bias", fc2_bias, c, "one per channel, h.shape[1]")
    check_optional_tensor(op, "bias", bias)
    check_numel(op, "bias", bias, c, "one per channel, h.shape[1]")
    check_optional_tensor(op, "shortcut_bias", shortcut_bias)
    check_numel(op, "shortcut_bias", shortcut_bias, c, "one per channel, h.shape[1]")
    check_optional_tensor(op, "skip_gain", skip_gain)
    check_numel(op, "skip_gain", skip_gain, 1, "a scalar gain")
    check_optional_tensor(op, "mask", mask)
    check_numel(op, "mask", mask, n, "one multiplier per sample, h.shape[0]")
    params = dict(fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                  eca_weight=eca_weight, bias=bias, shortcut_bias=shortcut_bias, skip_gain=skip_gain)
    check_same_device(op, h=h, shortcut=shortcut, **params, mask=mask)
    check_same_dtype(op, h=h, shortcut=shortcut)
    _check_param_dtypes(op, "h", h, **params)
    alpha = check_float(op, "alpha", alpha)
    attn_gain = check_float(op, "attn_gain", attn_gain)
    backend = _resolve(op, h.device)
    args = (h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias, shortcut_bias, skip_gain,
            mask, alpha, attn_gain)
    if backend == "torch" or h.numel() == 0:
        return _se.se_gate_residual_torch(*args)
    if backend == "cuda":
        return _se.se_gate_residual_cuda(*args)
    return _se.se_gate_residual_triton(*args)


def scaled_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: str = "gelu",
    gamma: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Scaled activation with a fused per-channel bias (NF-ResNet/NFNet nonlinearity)::

        y = gamma · scale · f(x + b_c)

    ``x`` has shape (N, C, ...); ``bias`` is optional with C elements (any shape, e.g. (C,)),
    broadcast over channel dim 1. ``act`` names f, one of ``nfkernels.NF_GAMMA``'s keys ("gelu"
    is exact erf GELU as in timm, "gelu_tanh" the tanh approximation as in DeepMind's JAX code).
    ``gamma=None`` takes f's NF gain from that table; an NF block passes scale = β. Computes in
    fp32 for fp16/bf16 inputs (fp64 for fp64); the result has x's dtype, shape and memory format
    (NCHW and channels_last run without copies). bias has x's dtype, or is float32 next to
    float16/bfloat16 x (autocast). Differentiable with respect to x and bias:
    dx = dy · gamma · scale · f'(x + b_c), dbias_c = Σ over all dims but 1 of dx.
    """
    op = "scaled_act"
    check_tensor(op, "x", x, min_ndim=2)
    check_optional_tensor(op, "bias", bias)
    check_numel(op, "bias", bias, x.shape[1], "one per channel, x.shape[1]")
    check_same_device(op, x=x, bias=bias)
    _check_param_dtypes(op, "x", x, bias=bias)
    act = check_choice(op, "act", act, _sa.ACTIVATIONS)
    gamma = _sa.NF_GAMMA[act] if gamma is None else check_float(op, "gamma", gamma)
    scale = check_float(op, "scale", scale)
    backend = _resolve(op, x.device)
    if backend == "torch" or x.numel() == 0:
        return _sa.scaled_act_torch(x, bias, act, gamma, scale)
    if backend == "cuda":
        return _sa.scaled_act_cuda(x, bias, act, gamma, scale)
    return _sa.scaled_act_triton(x, bias, act, gamma, scale)
