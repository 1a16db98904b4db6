"""A whole training step (forward, backward, optimizer) captured in one CUDA graph.

NFNets have no batch-norm statistics and nfkernels' AGC and SGD_AGC need no host
synchronisation, so the entire step of an NFNet can be captured once and replayed: one CPU launch
per step instead of thousands (PyTorch's "whole-network capture" recipe).
"""
from __future__ import annotations

from typing import Callable

import torch


class CUDAGraphTrainStep:
    """``step(x, y) -> loss``: copies the batch into static buffers and replays the captured step.

    Capture needs the step's memory to exist beforehand, so ``warmup_steps`` eager steps run first
    on a side stream (they create gradients, momentum buffers and the fused optimizer's row tables);
    then the parameters and buffers are restored to their values before warm-up and the momentum
    buffers zeroed (m·0 + g = g, the first-step rule), so the warm-up leaves no trace on training.
    Gradients are zeroed in place inside the graph (never set to None) so their addresses stay those
    the graph captured.

    Requirements: a CUDA model and an optimizer whose step does not synchronise with the host
    (``nfkernels.optim.SGD_AGC``, or torch optimizers with ``capturable=True``); fixed input shapes;
    no data-dependent Python control flow in the model. The returned loss tensor is the graph's
    static output: read it (``.item()``) before the next call.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample_input: torch.Tensor,
                 sample_target: torch.Tensor, *, amp_dtype: torch.dtype | None = None, warmup_steps: int = 3):
        if not torch.cuda.is_available() or sample_input.device.type != "cuda":
            raise RuntimeError("CUDAGraphTrainStep: needs a CUDA device and CUDA tensors "
                               f"(sample_input is on {sample_input.device})")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CUDAGraphTrainStep: warmup_steps must be an int >= 1; got {warmup_steps!r}")
        self.model, self.optimizer, self.loss_fn, self.amp_dtype = model, optimizer, loss_fn, amp_dtype
        self.static_input = sample_input.detach().clone()
        self.static_target = sample_target.detach().clone()
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream().wait_stream(side)

        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])
            for state in optimizer.state.values():
                buf = state.get("momentum_buffer")
                if isinstance(buf, torch.Tensor):
                    buf.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step()

    def _step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model(self.static_input), self.static_target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or y.shape != self.static_target.shape:
            raise ValueError(f"CUDAGraphTrainStep: the graph was captured for input {tuple(self.static_input.shape)} "
                             f"and target {tuple(self.static_target.shape)}; got {tuple(x.shape)}, {tuple(y.shape)}")
        self.static_input.copy_(x)
        self.static_target.copy_(y)
        self.graph.replay()
        return self.static_loss
