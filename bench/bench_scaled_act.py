"""Scaled activation with folded bias: nfkernels' fused kernel against the eager PyTorch chain
(bias add, GELU, ×γ — timm's conv bias + GammaAct) and torch.compile of that chain, on NFNet-F0's
activation shapes.

    python -m bench.bench_scaled_act [--quick] [--dtype bfloat16] [--channels-last]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import (COLUMNS, bench_device, copy_bandwidth_gbs, environment, nfnet_f0_activation_shapes,
                          run_providers, write_results)

GAMMA = nfk.NF_GAMMA["gelu"]


def eager_chain(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused reference: what timm runs between two convs (bias add, GELU, ×γ)."""
    return F.gelu(x + bias.view(1, -1, 1, 1)) * GAMMA


def fused(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return nfk.scaled_act(x, bias, act="gelu")


def _fwd(fn, x, b):
    def run():
        with torch.no_grad():
            fn(x, b)
    return run


def _fwd_bwd(fn, x, b, dy):
    def run():
        fn(x, b).backward(dy)
    return run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (default on CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (GPU), 2 (CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 192 (GPU), 64 (CPU)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    batch = args.batch or (2 if quick else 32)
    resolution = args.resolution or (64 if quick else 192)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    copy_gbs = copy_bandwidth_gbs(device)
    esize = torch.tensor([], dtype=dtype).element_size()
    compiled = None if quick else torch.compile(eager_chain, dynamic=False)
    rows = []
    for name, shape in nfnet_f0_activation_shapes(batch, resolution):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
        b = (0.1 * torch.randn(shape[1], generator=gen)).to(device, dtype).requires_grad_()
        dy = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
        numel = x.numel()
        providers = {"eager": _fwd(eager_chain, x, b), "nfkernels": _fwd(fused, x, b)}
        if compiled is not None:
            providers["torch.compile"] = _fwd(compiled, x, b)
        rows += run_providers(f"{name} {tuple(shape)} fwd", providers, 2 * numel * esize, device, copy_gbs, "eager")
        providers = {"eager": _fwd_bwd(eager_chain, x, b, dy), "nfkernels": _fwd_bwd(fused, x, b, dy)}
        if compiled is not None:
            providers["torch.compile"] = _fwd_bwd(compiled, x, b, dy)
        # forward reads x, writes y; backward reads dy and x, writes dx
        rows += run_providers(f"{name} {tuple(shape)} fwd+bwd", providers, 5 * numel * esize, device, copy_gbs,
                              "eager")
    meta = {**environment(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "resolution": resolution, "memory_format": "channels_last" if args.channels_last else "NCHW",
            "backend": nfk.get_backend(), "copy_GB/s": copy_gbs, "cpu_fallback": device.type == "cpu"}
    path = write_results("scaled_act", rows, COLUMNS, meta, device)
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
