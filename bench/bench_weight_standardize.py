"""Scaled Weight Standardization: nfkernels against timm's ScaledStdConv2d formulation (F.batch_norm
over the reshaped weight), eager and under torch.compile, on NFNet-F0's conv weights.

    python -m bench.bench_weight_standardize [--quick] [--dtype float32] [--out-dtype bfloat16]

The defaults time what a bf16-autocast training step runs: fp32 weights and gains, Ŵ written in
bf16 (the conv's compute dtype) and its gradient dŴ arriving in bf16. timm computes Ŵ in fp32 and
autocast casts it to bf16 at the conv, so the reference includes that cast. nfkernels is timed
conv by conv and, on a GPU, as the one batched launch per direction its models use
(``weight_standardize_batched``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import (COLUMNS, bench_device, copy_bandwidth_gbs, environment, nfkernels_impls,
                          nfnet_f0_conv_shapes, run_providers, write_results)

NOTES = {
    "eager": "timm ScaledStdConv2d.forward's weight path (F.batch_norm over the reshaped weight, gain and "
             "fan-in scale), written out: timm has no separate function for it; eager mode; then the cast "
             "to the Ŵ dtype that autocast applies at the conv",
    "torch.compile": "that weight path compiled by torch.compile (Inductor; GPU runs only)",
    "nfkernels batched": "every conv of the model in one launch per direction (weight_standardize_batched, "
                         "as NFNet's forward runs it; Triton, GPU runs only)",
}


def timm_style(weight: torch.Tensor, gain: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """timm ScaledStdConv2d.forward's weight path, the unfused reference."""
    scale = weight[0].numel() ** -0.5
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=(gain * scale).view(-1),
                        training=True, momentum=0.0, eps=eps).reshape_as(weight)


def _batched_fwd(params, out_dtype):
    def run():
        with torch.no_grad():
            nfk_batched(params, out_dtype)
    return run


def _batched_fwd_bwd(params, grads, out_dtype):
    def run():
        torch.autograd.backward(nfk_batched(params, out_dtype), grads)
    return run


def nfk_batched(params, out_dtype):
    """Ŵ of every (weight, gain) in one launch, with timm's gamma and eps."""
    from nfkernels.ops.weight_standardize import weight_standardize_batched

    n = len(params)
    return weight_standardize_batched([w for w, _ in params], [g for _, g in params], [1.0] * n, [1e-5] * n,
                                      [False] * n, out_dtype)


def _fwd_bwd(fn, params, grads):
    def run():
        for (w, g), dy in zip(params, grads):
            fn(w, g).backward(dy)
    return run


def _fwd(fn, params):
    def run():
        with torch.no_grad():
            for w, g in params:
                fn(w, g)
    return run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (default on CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight and gain dtype (default float32, as in mixed-precision training)")
    parser.add_argument("--out-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "same"],
                        help="dtype of Ŵ and dŴ (default bfloat16: the conv's dtype under bf16 autocast; "
                             "'same': the weight's)")
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type == "cpu"
    dtype = getattr(torch, args.dtype)
    out_dtype = dtype if args.out_dtype == "same" else getattr(torch, args.out_dtype)
    shapes = nfnet_f0_conv_shapes()
    if quick:
        shapes = shapes[:24]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [(torch.randn(s, generator=gen).to(device, dtype).requires_grad_(),
               (torch.rand(s[0], 1, 1, 1, generator=gen) + 0.5).to(device, dtype).requires_grad_()) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, out_dtype) for s in shapes]
    esize = torch.tensor([], dtype=dtype).element_size()
    out_esize = torch.tensor([], dtype=out_dtype).element_size()
    n_w = sum(w.numel() for w, _ in params)
    n_g = sum(g.numel() for _, g in params)
    fwd_bytes = (n_w + n_g) * esize + n_w * out_esize        # read W and gain, write Ŵ
    bwd_bytes = (2 * n_w + 2 * n_g) * esize + n_w * out_esize  # read dŴ and W, write dW (+ gain, dgain)
    copy_gbs = copy_bandwidth_gbs(device)

    def nfk_ws(w, g):
        return nfk.weight_standardize(w, g, out_dtype=out_dtype)

    def reference(w, g):
        return timm_style(w, g).to(out_dtype)

    impls = {"eager": reference, **nfkernels_impls(nfk_ws, params[0])}
    providers_fwd = {name: _fwd(fn, params) for name, fn in impls.items()}
    providers_fb = {name: _fwd_bwd(fn, params, grads) for name, fn in impls.items()}
    if not quick:
        compiled = torch.compile(reference, dynamic=False)
        providers_fwd["torch.compile"] = _fwd(compiled, params)
        providers_fb["torch.compile"] = _fwd_bwd(compiled, params, grads)
        # The batched op is Triton's own (no backend switch): what NFNet runs on the triton backend.
        providers_fwd["nfkernels batched"] = _batched_fwd(params, out_dtype)
        providers_fb["nfkernels batched"] = _batched_fwd_bwd(params, grads, out_dtype)
    label = f"F0 convs ({len(shapes)} weights)"
    rows = run_providers(f"{label} fwd", providers_fwd, fwd_bytes, device, copy_gbs, "eager")
    rows += run_providers(f"{label} fwd+bwd", providers_fb, fwd_bytes + bwd_bytes, device, copy_gbs, "eager")
    meta = {**environment(device), "dtype": args.dtype, "out_dtype": str(out_dtype).removeprefix("torch."),
            "backend": nfk.get_backend(),
            "copy_GB/s": copy_gbs, "cpu_fallback": device.type == "cpu"}
    path = write_results("weight_standardize", rows, COLUMNS, meta, device, notes=NOTES, reference="eager")
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
