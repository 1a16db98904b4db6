"""Scaled activation with folded bias: nfkernels' fused kernel against the eager PyTorch chain
(bias add, GELU, ×γ — timm's conv bias + GammaAct) and torch.compile of that chain, on NFNet-F0's
activation shapes.

It times the dtypes a bf16-autocast training step runs: bf16 (--dtype) activations next to an fp32
bias (autocast keeps parameters fp32), whose gradient comes back fp32. The bytes each row divides by
are the floor: the forward reads x and writes y; the backward reads dy and x and writes dx; the fp32
bias is read once per pass and dbias written once.

    python -m bench.bench_scaled_act [--quick] [--dtype bfloat16] [--channels-last]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import (COLUMNS, activation_bench_meta, activation_bench_setup, compare_fwd_and_bwd,
                          import_timm, nfkernels_impls, nfnet_f0_activation_shapes, reference_provider,
                          write_results)

GAMMA = nfk.NF_GAMMA["gelu"]
BIAS_DTYPE = torch.float32  # parameters stay fp32 under autocast, whatever the activations' dtype
NOTES = {
    "eager": "the unfused chain timm runs between two convs, written out: bias add, GELU, x gamma; eager mode",
    "timm": "timm's GammaAct('gelu', gamma) (dm_nfnet's activation) after the bias add, eager mode",
    "torch.compile": "the eager chain compiled by torch.compile (Inductor; GPU runs only)",
}


def eager_chain(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused reference: what timm runs between two convs (bias add, GELU, ×γ), in x's dtype
    (autocast casts the conv's fp32 bias to it)."""
    return F.gelu(x + bias.view(1, -1, 1, 1).to(x.dtype)) * GAMMA


def fused(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return nfk.scaled_act(x, bias, act="gelu")


def timm_chain():
    """timm's own activation with the conv's bias added first (timm adds it inside the conv), or
    None where timm does not import."""
    timm, _ = import_timm()
    if timm is None:
        return None
    from timm.models.nfnet import GammaAct

    act = GammaAct("gelu", gamma=GAMMA)

    def run(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return act(x + bias.view(1, -1, 1, 1).to(x.dtype))
    return run


def main(argv=None) -> list[dict]:
    args = activation_bench_setup(__doc__, argv)
    compiled = None if args.quick else torch.compile(eager_chain, dynamic=False)
    timm_impl = timm_chain()
    rows = []
    for name, shape in nfnet_f0_activation_shapes(args.batch, args.resolution):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(args.device, args.dtype).contiguous(memory_format=args.memory_format)
        b = (0.1 * torch.randn(shape[1], generator=gen)).to(args.device, BIAS_DTYPE)  # an fp32 parameter
        dy = torch.randn(shape, generator=gen).to(args.device, args.dtype).contiguous(memory_format=args.memory_format)
        impls = {**({"timm": timm_impl} if timm_impl else {}), "eager": eager_chain, **nfkernels_impls(fused, (x, b))}
        if compiled is not None:
            impls["torch.compile"] = compiled
        tensor_bytes = x.numel() * args.esize
        bias_bytes = b.numel() * b.element_size()
        # forward: read x, write y (and read the bias); backward: read dy and x, write dx, read the
        # bias again and write dbias
        rows += compare_fwd_and_bwd(f"{name} {tuple(shape)}", impls, (x.requires_grad_(), b.requires_grad_()), dy,
                                    2 * tensor_bytes + bias_bytes, 5 * tensor_bytes + 3 * bias_bytes, args.device,
                                    args.copy_gbs)
    name = "scaled_act_" + ("channels_last" if args.channels_last else "nchw")
    path = write_results(name, rows, COLUMNS, {**activation_bench_meta(args), "bias_dtype": str(BIAS_DTYPE)[6:]},
                         args.device, notes=NOTES,
                         reference=reference_provider({r["provider"] for r in rows}))
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
