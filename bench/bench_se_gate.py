"""Squeeze-excite gate with the SkipInit residual: nfkernels' fused op against timm's eager block
tail (conv3 bias, SE, ×attn_gain, ×skipinit_gain, ×alpha, + shortcut) and torch.compile of it, on
NFNet-F0's block-output shapes.

    python -m bench.bench_se_gate [--quick] [--dtype bfloat16] [--channels-last]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import (COLUMNS, bench_device, copy_bandwidth_gbs, environment, nfnet_f0_activation_shapes,
                          run_providers, write_results)

ALPHA, ATTN_GAIN = 0.2, 2.0


def eager_tail(h, shortcut, w1, b1, w2, b2, bias, skip):
    """timm NormFreeBlock after conv3: out = attn_gain·SE(h + b); out *= skip; out·alpha + shortcut."""
    out = h + bias.view(1, -1, 1, 1)
    gate = torch.sigmoid(F.conv2d(F.relu(F.conv2d(out.mean((2, 3), keepdim=True), w1, b1)), w2, b2))
    out = ATTN_GAIN * (out * gate)
    out = out * skip
    return out * ALPHA + shortcut


def fused(h, shortcut, w1, b1, w2, b2, bias, skip):
    return nfk.se_gate_residual(h, shortcut, w1, b1, w2, b2, bias=bias, skip_gain=skip, alpha=ALPHA,
                                attn_gain=ATTN_GAIN)


def _fwd(fn, args):
    def run():
        with torch.no_grad():
            fn(*args)
    return run


def _fwd_bwd(fn, args, dout):
    def run():
        fn(*args).backward(dout)
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
    compiled = None if quick else torch.compile(eager_tail, dynamic=False)
    rows = []
    for name, shape in nfnet_f0_activation_shapes(batch, resolution):
        if not name.endswith("_out"):
            continue
        c, rd = shape[1], shape[1] // 2
        gen = torch.Generator().manual_seed(0)

        def rnd(*size, scale=1.0, fmt=torch.contiguous_format):
            t = (scale * torch.randn(size, generator=gen)).to(device, dtype)
            return t.contiguous(memory_format=fmt).requires_grad_()

        args_ = (rnd(*shape, fmt=fmt), rnd(*shape, fmt=fmt), rnd(rd, c, 1, 1, scale=c ** -0.5), rnd(rd, scale=0.1),
                 rnd(c, rd, 1, 1, scale=rd ** -0.5), rnd(c, scale=0.1), rnd(c, scale=0.1), rnd(scale=1.0))
        dout = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
        numel = args_[0].numel()
        providers = {"eager": _fwd(eager_tail, args_), "nfkernels": _fwd(fused, args_)}
        if compiled is not None:
            providers["torch.compile"] = _fwd(compiled, args_)
        # floor: read h and shortcut, write out
        rows += run_providers(f"{name} {tuple(shape)} fwd", providers, 3 * numel * esize, device, copy_gbs, "eager")
        providers = {"eager": _fwd_bwd(eager_tail, args_, dout), "nfkernels": _fwd_bwd(fused, args_, dout)}
        if compiled is not None:
            providers["torch.compile"] = _fwd_bwd(compiled, args_, dout)
        # + backward: read dout and h, write dh (dshortcut is dout itself)
        rows += run_providers(f"{name} {tuple(shape)} fwd+bwd", providers, 6 * numel * esize, device, copy_gbs,
                              "eager")
    meta = {**environment(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "resolution": resolution, "memory_format": "channels_last" if args.channels_last else "NCHW",
            "backend": nfk.get_backend(), "copy_GB/s": copy_gbs, "cpu_fallback": device.type == "cpu"}
    path = write_results("se_gate", rows, COLUMNS, meta, device)
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
