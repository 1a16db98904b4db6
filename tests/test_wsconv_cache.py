"""WSConv2d's standardized weight: recomputed on every call by default (no silent staleness after
edits through ``.data``), frozen only on request, and never part of saved state (issue 11, item 5).

Every output is checked against timm's formulation (F.batch_norm over the weight) in float64."""
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
import nfkernels.nn.conv as conv_module
from nfkernels.nn import WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for

BACKENDS = backends_for(("torch", "triton"))
FP32_TOL = 2e-5


def ref_standardize64(weight, gain, eps=1e-5):
    """timm ScaledStdConv2d in float64: F.batch_norm over (1, O, fan_in), weight = gain / sqrt(fan_in)."""
    w, g = weight.detach().double(), gain.detach().double()
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=(g * w[0].numel() ** -0.5).view(-1),
                        training=True, momentum=0.0, eps=eps).reshape_as(w)


def ref_conv64(x, conv):
    w = ref_standardize64(conv.weight, conv.gain, conv.eps)
    bias = None if conv.bias is None else conv.bias.detach().double()
    return F.conv2d(x.detach().double(), w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def make_conv(seed=0, cin=4, cout=6, **kw):
    conv = WSConv2d(cin, cout, 3, **kw).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(conv.weight[0].numel()))
        conv.gain.copy_(0.5 + torch.rand(conv.gain.shape, generator=g))
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
    return conv


def make_input(seed=1, cin=4, requires_grad=False):
    x = torch.randn(2, cin, 7, 6, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return x.requires_grad_(requires_grad)


@pytest.fixture
def count_standardize(monkeypatch):
    """How many times WSConv2d computes Ŵ (wraps the functional it calls)."""
    calls = []
    real = conv_module.weight_standardize

    def counted(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_module, "weight_standardize", counted)
    return calls


def _prune(conv):
    conv.weight.data[:, :, 0, :] = 0.0    # magnitude-pruning style edit, through .data


def _ema(conv):
    conv.weight.data.mul_(0.5).add_(0.25)  # custom EMA / quantisation style edit, through .data
    conv.gain.data.mul_(0.5)


def _params_without_grad(conv):
    conv.requires_grad_(False)  # fine-tuning a head on a fixed backbone: grad mode stays on
    return torch.enable_grad()


CONTEXTS = {
    "no_grad": lambda conv: torch.no_grad(),
    "inference_mode": lambda conv: torch.inference_mode(),
    "params_without_grad": _params_without_grad,
}


# ------------------------------------------------------------------------------- default: no cache
@pytest.mark.parametrize("edit", [_prune, _ema], ids=["prune", "ema"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_default_sees_data_edits_in_eval_without_grad(context, edit):
    conv = make_conv().eval()
    x = make_input()
    with CONTEXTS[context](conv):
        before = conv(x)
        assert_close(before, ref_conv64(x, conv), FP32_TOL, "before the edit")
        edit(conv)
        after = conv(x)
    assert_close(after, ref_conv64(x, conv), FP32_TOL, f"after a .data edit under {context}")


def test_default_recomputes_every_call_and_stores_nothing(count_standardize):
    conv = make_conv().eval()
    x = make_input()
    with torch.no_grad():
        conv(x), conv(x)
    with torch.inference_mode():
        conv(x)
    assert len(count_standardize) == 3
    assert not conv.standardized_weight_frozen


def test_eval_forward_does_not_grow_the_saved_model():
    conv = make_conv(cin=32, cout=64).eval()
    fresh = _saved_size(conv)
    with torch.no_grad():
        conv(make_input(cin=32))
    assert _saved_size(conv) == fresh, "an eval forward left data that torch.save(model) stores"


# ---------------------------------------------------------------------------------------- frozen
def _saved_size(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    return len(buf.getvalue())


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_conv_matches_float64_math_without_recomputing(backend, count_standardize):
    conv = make_conv(padding="same", stride=2).eval()
    x = make_input()
    with nfk.use_backend(backend):
        assert conv.freeze_standardized_weight() is conv and conv.standardized_weight_frozen
        assert len(count_standardize) == 1  # Ŵ computed once, at freezing
        with torch.no_grad():
            outs = [conv(x) for _ in range(3)]
        with torch.inference_mode():
            outs.append(conv(x))
    assert len(count_standardize) == 1      # ... and never again while frozen without grad
    for out in outs:
        assert_close(out, ref_conv64(F.pad(x, (0, 1, 1, 1)), conv), FP32_TOL, "frozen forward")
    assert "standardized_weight=frozen" in repr(conv)


def test_frozen_conv_recomputes_when_gradients_are_needed(count_standardize):
    """The frozen Ŵ has no graph to weight and gain: a forward that needs their gradients must not
    use it (the gradients would silently be missing)."""
    conv = make_conv().freeze_standardized_weight()
    x = make_input(requires_grad=True)
    out = conv(x)
    assert len(count_standardize) == 2
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out.backward(dout)
    w64 = conv.weight.detach().double().requires_grad_(True)
    g64 = conv.gain.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w_hat = F.batch_norm(w64.reshape(1, 6, -1), None, None, weight=(g64 * w64[0].numel() ** -0.5).view(-1),
                         training=True, momentum=0.0, eps=1e-5).reshape_as(w64)
    ref = F.conv2d(x64, w_hat, conv.bias.detach().double(), padding=1)
    ref.backward(dout.double())
    assert_close(out, ref, FP32_TOL, "forward")
    assert_close(conv.weight.grad, w64.grad, FP32_TOL, "dW")
    assert_close(conv.gain.grad, g64.grad, FP32_TOL, "dgain")
    assert_close(x.grad, x64.grad, FP32_TOL, "dx")


def test_frozen_in_inference_mode_still_serves_a_backward_through_the_input():
    conv = make_conv().eval().requires_grad_(False)
    with torch.inference_mode():
        conv.freeze_standardized_weight()
        conv(make_input())
    x = make_input(requires_grad=True)
    conv(x).sum().backward()  # the frozen Ŵ must not be an inference tensor
    w = ref_standardize64(conv.weight, conv.gain)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w, torch.ones(2, 6, 7, 6, dtype=torch.float64), padding=1)
    assert_close(x.grad, ref_dx, FP32_TOL, "dx with a frozen Ŵ")


CHANGES = {
    "optimizer_step": lambda conv: torch.optim.SGD(conv.parameters(), lr=0.5).step(),
    "in_place": lambda conv: conv.weight.mul_(-1.0),
    "gain_in_place": lambda conv: conv.gain.mul_(3.0),
    "load_state_dict": lambda conv: conv.load_state_dict({k: v.flip(0) for k, v in conv.state_dict().items()}),
    "cast": lambda conv: conv.double(),
    "replaced": lambda conv: setattr(conv, "weight", torch.nn.Parameter(conv.weight.detach() + 1.0)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_frozen_conv_refuses_a_weight_it_can_see_has_changed(change):
    conv = make_conv().eval().freeze_standardized_weight()
    x = make_input()
    for p in conv.parameters():
        p.grad = torch.ones_like(p)
    with torch.no_grad():
        CHANGES[change](conv)
        with pytest.raises(RuntimeError, match=r"freeze_standardized_weight\(\) again"):
            conv(x.to(conv.weight.dtype))
        conv.freeze_standardized_weight()  # re-freezing takes the new weight
        out = conv(x.to(conv.weight.dtype))
    assert_close(out, ref_conv64(x, conv), FP32_TOL, f"re-frozen after {change}")


def test_unfreeze_goes_back_to_recomputing(count_standardize):
    conv = make_conv().eval().freeze_standardized_weight()
    assert conv.unfreeze_standardized_weight() is conv and not conv.standardized_weight_frozen
    x = make_input()
    with torch.no_grad():
        _ema(conv)
        out = conv(x)
    assert len(count_standardize) == 2
    assert_close(out, ref_conv64(x, conv), FP32_TOL, "unfrozen after a .data edit")


AMP_DTYPE = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16


def test_frozen_conv_under_autocast_uses_a_compute_dtype_copy(count_standardize):
    conv = make_conv().eval().freeze_standardized_weight()
    x = make_input()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=AMP_DTYPE):
        w_low = conv.standardized_weight()
        assert w_low.dtype == AMP_DTYPE and conv.standardized_weight() is w_low  # made once
        out = conv(x)
    assert out.dtype == AMP_DTYPE and len(count_standardize) == 1
    w64 = ref_standardize64(conv.weight, conv.gain)
    assert_close(w_low, w64, 8e-3, "bf16 frozen Ŵ")  # one rounding to 8 mantissa bits
    assert_close(out, ref_conv64(x, conv), 2e-2, "bf16 frozen conv")
    with torch.no_grad():
        assert conv.standardized_weight().dtype == torch.float32
        assert_close(conv.standardized_weight(), w64, FP32_TOL, "fp32 frozen Ŵ after autocast")


def test_frozen_conv_compiles_without_graph_breaks(count_standardize):
    conv = make_conv().eval().freeze_standardized_weight()
    x = make_input()
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), nfk.use_backend("torch"):
        out = compiled(x)
    assert len(count_standardize) == 1  # the graph reads the frozen Ŵ instead of computing one
    assert_close(out, ref_conv64(x, conv), FP32_TOL, "compiled frozen conv")


# ---------------------------------------------------------------------------------- saved state
def test_frozen_weight_stays_out_of_state_dict_and_pickles():
    conv = make_conv(cin=32, cout=64).eval()
    unfrozen_size = _saved_size(conv)
    conv.freeze_standardized_weight()
    assert set(conv.state_dict()) == {"weight", "bias", "gain"}
    frozen_size = _saved_size(conv)
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    assert abs(frozen_size - unfrozen_size) < weight_bytes // 10, (frozen_size, unfrozen_size, weight_bytes)
    assert len(pickle.dumps(conv)) < len(pickle.dumps(make_conv(cin=32, cout=64))) + weight_bytes // 10


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_copy_of_a_frozen_conv_is_frozen_and_correct(how):
    conv = make_conv().eval().freeze_standardized_weight()
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    else:
        copied = copy.deepcopy(conv)
    assert copied.standardized_weight_frozen
    x = make_input()
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # the original changes; the copy keeps its own weight
        out = copied(x)
    assert_close(out, ref_conv64(x, copied), FP32_TOL, f"frozen conv after {how}")
    assert not torch.equal(copied.weight, conv.weight)


def test_a_conv_pickled_with_the_old_implicit_cache_loads_unfrozen():
    conv = make_conv().eval()
    state = conv.__getstate__()
    del state["_freeze_requested"], state["_frozen"]
    state["_cached_weight"] = ((0,), torch.zeros_like(conv.weight))  # what older versions stored
    old = WSConv2d.__new__(WSConv2d)
    old.__setstate__(state)
    assert not old.standardized_weight_frozen and "_cached_weight" not in old.__dict__
    x = make_input()
    with torch.no_grad():
        assert_close(old(x), ref_conv64(x, old), FP32_TOL, "old pickle")


# ------------------------------------------------------------------------------- model-level API
def test_model_helpers_count_and_check_their_argument():
    model = torch.nn.Sequential(make_conv(cin=4, cout=6), torch.nn.ReLU(),
                                torch.nn.Sequential(make_conv(seed=2, cin=6, cout=4)))
    assert nfk.nn.freeze_standardized_weights(model) == 2
    assert all(m.standardized_weight_frozen for m in (model[0], model[2][0]))
    assert nfk.nn.unfreeze_standardized_weights(model) == 2
    assert nfk.nn.unfreeze_standardized_weights(model) == 0
    assert not model[0].standardized_weight_frozen
    assert nfk.nn.freeze_standardized_weights(model[0]) == 1  # the module itself counts
    assert nfk.nn.freeze_standardized_weights(torch.nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nfk.nn.freeze_standardized_weights("nfnet_f0")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nfk.nn.unfreeze_standardized_weights(None)
