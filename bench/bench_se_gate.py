"""Squeeze-excite gate with the SkipInit residual: nfkernels' fused op against timm's eager block
tail (conv3 bias, SE, ×attn_gain, ×skipinit_gain, ×alpha, + shortcut) and torch.compile of it, on
NFNet-F0's block-output shapes.

    python -m bench.bench_se_gate [--quick] [--dtype bfloat16] [--channels-last]

Bytes, in passes over one activation tensor (N·C·H·W elements): the floor, what any
implementation must move, is 3 forward (read h and the shortcut, write out) and 6 forward +
backward (also read dout and h, write dh; the shortcut's gradient is dout itself). nfkernels'
kernels make 4 and 8: the pooling reads h before the gate can read it again, and the backward
reduction reads dout before the streaming kernel reads it again. `GB/s` and `frac_copy_bw` count
the floor (how close a provider comes to it); `moved_GB/s` counts the passes the fused kernels
make (the bandwidth they reach), for the nfkernels Triton and CUDA rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import (COLUMNS, activation_bench_meta, activation_bench_setup, compare_fwd_and_bwd,
                          import_timm, nfkernels_impls, nfnet_f0_activation_shapes, reference_provider,
                          write_results)

ALPHA, ATTN_GAIN = 0.2, 2.0
# Passes over the activation tensor, per direction (module docstring). The fused kernels' (N, C)
# traffic (pooled sums, the reductions' per-split partial sums, the SE MLP) is left out: under 1%
# at F0's shapes.
FLOOR_PASSES = {"fwd": 3, "fwd+bwd": 6}
FUSED_PASSES = {"fwd": 4, "fwd+bwd": 8}
FUSED_PROVIDERS = ("nfkernels triton", "nfkernels cuda")
SE_COLUMNS = COLUMNS[:5] + ["floor_MB", "GB/s", "frac_copy_bw", "moved_MB", "moved_GB/s"] + COLUMNS[7:]
BYTES_NOTE = ("`floor_MB` is what any implementation must move (3 passes over the activation forward, 6 forward + "
              "backward), the bytes `GB/s` counts; `frac_copy_bw` is thus the fraction of the bandwidth floor a "
              "provider reaches. `moved_MB` is what nfkernels' fused kernels move (4 and 8 passes: the pooling and the "
              "backward reduction each read a tensor the next kernel reads again), `moved_GB/s` the bandwidth they "
              "reach doing it; their (N, C) traffic (pooled sums, partial sums, the SE MLP) is under 1% and left out. "
              "Blank for providers whose traffic is not counted.")


def add_bytes(rows: list[dict], tensor_bytes: int) -> None:
    """floor_MB on every row; moved_MB and moved_GB/s on the fused kernels' rows."""
    for row in rows:
        direction = "fwd+bwd" if row["case"].endswith("fwd+bwd") else "fwd"
        row["floor_MB"] = FLOOR_PASSES[direction] * tensor_bytes / 1e6
        moved = FUSED_PASSES[direction] * tensor_bytes if row["provider"] in FUSED_PROVIDERS else None
        row["moved_MB"] = moved / 1e6 if moved is not None else None
        row["moved_GB/s"] = moved / (row["ms"] * 1e-3) / 1e9 if moved is not None else None
NOTES = {
    "eager": "timm NormFreeBlock's tail after conv3, written out: bias add, squeeze-excite, x attn_gain, "
             "x skipinit_gain, x alpha, + shortcut; eager mode",
    "timm": "the same tail with timm's own SEModule (rd_ratio 0.5) and NormFreeBlock's arithmetic, eager mode",
    "torch.compile": "the eager tail compiled by torch.compile (Inductor; GPU runs only)",
}


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


def timm_tail(channels: int, w1, b1, w2, b2):
    """NormFreeBlock's tail with timm's SEModule holding these weights, or None where timm does not
    import."""
    timm, _ = import_timm()
    if timm is None:
        return None
    from timm.layers import SEModule

    se = SEModule(channels, rd_ratio=0.5).to(w1.device, w1.dtype)
    if (se.fc1.weight.shape, se.fc2.weight.shape) != (w1.shape, w2.shape):
        raise RuntimeError(f"timm SEModule({channels}, rd_ratio=0.5) has fc1 {tuple(se.fc1.weight.shape)}, "
                           f"fc2 {tuple(se.fc2.weight.shape)}; the benchmark's weights are {tuple(w1.shape)}, "
                           f"{tuple(w2.shape)}")
    se.fc1.weight, se.fc1.bias = torch.nn.Parameter(w1.detach()), torch.nn.Parameter(b1.detach())
    se.fc2.weight, se.fc2.bias = torch.nn.Parameter(w2.detach()), torch.nn.Parameter(b2.detach())

    def run(h, shortcut, w1, b1, w2, b2, bias, skip):
        out = ATTN_GAIN * se(h + bias.view(1, -1, 1, 1))
        out.mul_(skip)  # NormFreeBlock.forward: out.mul_(self.skipinit_gain)
        return out * ALPHA + shortcut
    return run


def main(argv=None) -> list[dict]:
    args = activation_bench_setup(__doc__, argv)
    compiled = None if args.quick else torch.compile(eager_tail, dynamic=False)
    rows = []
    for name, shape in nfnet_f0_activation_shapes(args.batch, args.resolution):
        if not name.endswith("_out"):
            continue
        c, rd = shape[1], shape[1] // 2
        gen = torch.Generator().manual_seed(0)

        def rnd(*size, scale=1.0, fmt=torch.contiguous_format):
            t = (scale * torch.randn(size, generator=gen)).to(args.device, args.dtype)
            return t.contiguous(memory_format=fmt).requires_grad_()

        fmt = args.memory_format
        inputs = (rnd(*shape, fmt=fmt), rnd(*shape, fmt=fmt), rnd(rd, c, 1, 1, scale=c ** -0.5), rnd(rd, scale=0.1),
                  rnd(c, rd, 1, 1, scale=rd ** -0.5), rnd(c, scale=0.1), rnd(c, scale=0.1), rnd(scale=1.0))
        dout = torch.randn(shape, generator=gen).to(args.device, args.dtype).contiguous(memory_format=fmt)
        timm_impl = timm_tail(c, *inputs[2:6])
        impls = {**({"timm": timm_impl} if timm_impl else {}), "eager": eager_tail, **nfkernels_impls(fused, inputs)}
        if compiled is not None:
            impls["torch.compile"] = compiled
        tensor_bytes = inputs[0].numel() * args.esize
        case_rows = compare_fwd_and_bwd(f"{name} {tuple(shape)}", impls, inputs, dout,
                                        FLOOR_PASSES["fwd"] * tensor_bytes, FLOOR_PASSES["fwd+bwd"] * tensor_bytes,
                                        args.device, args.copy_gbs)
        add_bytes(case_rows, tensor_bytes)
        rows += case_rows
    name = "se_gate_" + ("channels_last" if args.channels_last else "nchw")
    path = write_results(name, rows, SE_COLUMNS, activation_bench_meta(args), args.device, notes=NOTES,
                         reference=reference_provider({r["provider"] for r in rows}), appendix=BYTES_NOTE)
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
