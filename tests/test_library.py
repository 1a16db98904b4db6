"""nfkernels.ops._library.observe_launches: the one launch path every op shares, which
bench/step_profile.py observes (counting launches) or empties (measuring host cost alone)."""
import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import _library
from nfk_testing import backends_for

pytestmark = pytest.mark.skipif("triton" not in backends_for(("triton",)), reason="needs the triton backend")


def _step(x, bias, param):
    y = nfk.scaled_act(x, bias, act="gelu")
    y.sum().backward()
    nfk.agc_([param])
    return y


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    bias = torch.randn(3, generator=gen, requires_grad=True)
    param = torch.nn.Parameter(torch.randn(5, 6, generator=gen))
    param.grad = torch.randn(5, 6, generator=gen) * 10
    return x, bias, param


def test_observed_launches_run_and_are_recorded():
    x, bias, param = _inputs()
    expected_grad = param.grad.clone()
    with nfk.use_backend("torch"):
        expected = _step(x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_(),
                         torch.nn.Parameter(param.detach().clone()))
    seen = []
    with nfk.use_backend("triton"), _library.observe_launches(seen.append):
        y = _step(x, bias, param)
    assert seen == ["_scaled_act_fwd_kernel", "_scaled_act_bwd_kernel", "_agc_kernel"]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(param.grad, expected_grad)  # clipped: the launch ran


def test_launches_that_do_not_run_leave_outputs_unwritten_and_nest():
    x, bias, param = _inputs()
    before = param.grad.clone()
    outer, inner = [], []
    with nfk.use_backend("triton"), _library.observe_launches(outer.append, run=False):
        with _library.observe_launches(inner.append, run=False):
            _step(x, bias, param)
        nfk.agc_([param])
    assert inner == ["_scaled_act_fwd_kernel", "_scaled_act_bwd_kernel", "_agc_kernel"]
    assert outer == ["_agc_kernel"]  # the inner context restored the outer observer
    assert torch.equal(param.grad, before)  # no kernel ran
    assert _library._launch_observer is None
