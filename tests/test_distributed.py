"""agc_ and SGD_AGC under DistributedDataParallel and FSDP2 (fully_shard), two CPU processes on
gloo: the result must be the single-process one (gradients averaged before clipping). Each test
spawns its ranks once and runs every backend that can run here inside them."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.optim import SGD_AGC
from nfk_testing import assert_close, backends_for
from test_agc import timm_adaptive_clip_grad

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
TIMEOUT_S = 150
CLIP_FACTOR = 0.05  # with CE gradients at init this clips some units and keeps others
STEPS = 3
LR = 0.2
# Ranks run on CPU: the backends CPU tensors support (torch, and Triton under the interpreter).
BACKENDS = [b for b in backends_for(("torch", "triton")) if b in ("torch", "triton")]


class Net(torch.nn.Module):
    """Conv weight with a (O,1,1,1) gain, biases, a 1-element scale (FSDP2 cannot shard 0-D
    parameters) and two linears; odd dim-0 sizes so that the shards are uneven."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.gain = torch.nn.Parameter(torch.full((5, 1, 1, 1), 1.1))
        self.scale = torch.nn.Parameter(torch.tensor([0.7]))
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        h = F.conv2d(x, self.conv.weight * self.gain, self.conv.bias)
        h = F.gelu(h).mean(dim=(2, 3)) * self.scale
        return self.fc2(torch.tanh(self.fc1(h)))


def make_model_and_data():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, x, y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, mode: str, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        for backend in BACKENDS:
            model, x, y = make_model_and_data()
            xs, ys = x[rank::WORLD], y[rank::WORLD]  # equal halves: mean of means = full mean
            if mode == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                full = lambda t: t.detach().clone()  # noqa: E731
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                fully_shard(model.fc1, mesh=mesh)
                fully_shard(model.fc2, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
                full = lambda t: t.full_tensor().detach().clone()  # noqa: E731
            with nfk.use_backend(backend):
                F.cross_entropy(wrapped(xs), ys).backward()
                nfk.agc_(model.parameters(), clip_factor=CLIP_FACTOR)
                clipped = {n: full(p.grad) for n, p in model.named_parameters()}
                opt = SGD_AGC(model.parameters(), lr=LR, clip_factor=CLIP_FACTOR, weight_decay=1e-3)
                for _ in range(STEPS):
                    opt.zero_grad()
                    F.cross_entropy(wrapped(xs), ys).backward()
                    opt.step()
            results[backend] = {"grads": clipped, "params": {n: full(p) for n, p in model.named_parameters()}}
        torch.save(results, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(mode: str, out_dir) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(mode, _free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{mode}: ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"{mode}_rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_reference():
    """Full batch in one process: timm's AGC on the gradients, and torch.optim.SGD + timm AGC."""
    model, x, y = make_model_and_data()
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = timm_adaptive_clip_grad([p.grad for p in params], params, CLIP_FACTOR)
    clipped = {n: g for (n, _), g in zip(model.named_parameters(), grads)}
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p, g in zip(params, timm_adaptive_clip_grad([p.grad for p in params], params, CLIP_FACTOR)):
            p.grad.copy_(g)
        opt.step()
    return clipped, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(mode, tmp_path):
    ranks = _run_ranks(mode, tmp_path)
    clipped, params = single_process_reference()
    for rank, results in enumerate(ranks):
        assert sorted(results) == sorted(BACKENDS)
        for backend, got in results.items():
            for name in params:
                assert_close(got["grads"][name], clipped[name], 1e-7, f"rank {rank} {backend} grad {name}")
                assert_close(got["params"][name], params[name], 1e-7, f"rank {rank} {backend} param {name}")
    model, x, y = make_model_and_data()  # the case exercises both branches of the clip
    F.cross_entropy(model(x), y).backward()
    some_clipped = any(not torch.allclose(p.grad, clipped[n]) for n, p in model.named_parameters())
    some_kept = any(torch.equal(p.grad, clipped[n]) for n, p in model.named_parameters())
    assert some_clipped and some_kept
