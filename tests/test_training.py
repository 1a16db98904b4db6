"""CUDAGraphTrainStep: the captured step equals eager steps (GPU), clear errors elsewhere."""
import copy

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import NFNet, TINY_CONFIG as TINY
from nfkernels.training import CUDAGraphTrainStep
from nfk_testing import ON_GPU, assert_close


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_needs_cuda():
    model = NFNet(TINY, num_classes=10)
    opt = nfk.optim.SGD_AGC(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphTrainStep(model, opt, F.cross_entropy, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))


@pytest.mark.gpu
def test_replayed_steps_equal_eager_steps():
    torch.manual_seed(0)
    model = NFNet(TINY, num_classes=10).cuda()
    twin = copy.deepcopy(model)
    xs = [torch.randn(4, 3, 32, 32, device="cuda") for _ in range(4)]
    ys = [torch.randint(0, 10, (4,), device="cuda") for _ in range(4)]
    opt = nfk.optim.SGD_AGC(nfk.optim.nfnet_param_groups(model, 1e-4), lr=0.05)
    graphed = CUDAGraphTrainStep(model, opt, F.cross_entropy, xs[0], ys[0])
    twin_opt = nfk.optim.SGD_AGC(nfk.optim.nfnet_param_groups(twin, 1e-4), lr=0.05)
    for x, y in zip(xs, ys):
        loss = graphed(x, y).item()
        twin_opt.zero_grad()
        twin_loss = F.cross_entropy(twin(x), y)
        twin_loss.backward()
        twin_opt.step()
        assert loss == pytest.approx(twin_loss.item(), rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q, 1e-4, name)
    with pytest.raises(ValueError, match="captured for input"):
        graphed(torch.randn(2, 3, 32, 32, device="cuda"), ys[0][:2])
