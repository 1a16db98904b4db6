"""AGC and SGD+AGC on NFNet-F0's parameter shapes: nfkernels.agc_ / SGD_AGC against timm's
per-parameter loop (timm/utils/agc.py: timm's own where timm imports, and written out below) and
torch.optim.SGD, fused where available (docs/design.md §7).

    python -m bench.bench_agc            # full F0 shapes on a GPU; --quick on a CPU
    python -m bench.bench_agc --quick    # channels / 4 (~1/16 of the parameters), few reps

Bytes moved, the floor for these memory-bound ops: agc_ reads W and G and writes G (counted
in full: every unit may be clipped); an SGD step reads p, g, buf and writes p, buf.
"""
from __future__ import annotations

import argparse

import torch

import nfkernels as nfk
from bench.common import (bench_device, copy_bandwidth_gbs, device_name, environment, import_timm, nfnet_on_meta,
                          reference_provider, sig, time_ms, write_results)
from nfkernels import _backend

COLUMNS = ["case", "provider", "ms", "ms_p20", "ms_p80", "GB/s", "frac_copy_bw", "speedup_vs_ref"]
AGC_CASE, SGD_CASE = "agc_", "SGD_AGC step"
NOTES = {
    "timm": "timm.utils.agc.adaptive_clip_grad, timm's own per-parameter loop; in the SGD_AGC step followed by "
            "torch.optim.SGD (nesterov)",
    "eager": "timm's per-parameter AGC loop written out (bench/bench_agc.py); in the SGD_AGC step followed by "
             "torch.optim.SGD (nesterov)",
    "torch SGD fused, no AGC": "torch.optim.SGD(fused=True) without clipping: one fused optimizer step, the "
                               "floor for a step that reads and writes every parameter",
    "nfkernels torch": "nfkernels.agc_ / optim.SGD_AGC on the plain-PyTorch path (backend 'torch'), what runs on a "
                       "CPU",
    "nfkernels triton": "nfkernels.agc_ / optim.SGD_AGC with the fused Triton kernels (backend 'triton')",
    "nfkernels cuda": "nfkernels.agc_ / optim.SGD_AGC with the fused CUDA kernels (backend 'cuda')",
}


def timm_unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad, verbatim in substance."""
    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = timm_unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = timm_unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def make_params(shapes, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in shapes:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype) / fan_in ** 0.5)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.01 / fan_in ** 0.5
        params.append(p)
    return params


def launch_geometry(shapes, itemsize: int = 4) -> dict:
    """The fused launch over aligned parameters of ``shapes`` and ``itemsize``: units, single-element
    units, Triton programs and the fraction of their lanes that hold an element (nfkernels.ops.agc)."""
    import numpy as np

    from nfkernels.ops import agc as agc_ops

    units = np.array([shape[0] if len(shape) > 1 else 1 for _, shape in shapes], dtype=np.int64)
    numels = np.array([int(torch.Size(shape).numel()) for _, shape in shapes], dtype=np.int64)
    layout = agc_ops.row_layout(units, numels // np.maximum(units, 1), (itemsize, itemsize))
    elements, lanes = layout.lanes()
    programs = -(-layout.n_singles // layout.flat_block) + layout.vector.programs() + layout.scalar.programs()
    return {"units": layout.n_units, "single_element_units": layout.n_singles, "triton_programs": programs,
            "active_lanes": round(elements / lanes, 4)}


def fused_sgd_available(device: torch.device) -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="channels / 4 and few reps (default on CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type == "cpu"
    dtype = getattr(torch, args.dtype)
    shapes = [(n, tuple(p.shape)) for n, p in nfnet_on_meta("f0", width_div=4 if quick else 1).named_parameters()]
    clip_shapes = [s for s in shapes if not s[0].startswith("head.fc")]
    n_params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    if device.type == "cpu":
        print("bench_agc: no CUDA device, CPU fallback: nfkernels runs its torch reference path "
              f"(--quick shapes: F0 channels / 4, {n_params / 1e6:.2f}M parameters)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    copy_gbs = copy_bandwidth_gbs(device)
    reps = dict(cpu_reps=5) if device.type == "cpu" else {}
    params = make_params(clip_shapes, device, dtype)
    grads0 = [p.grad.clone() for p in params]
    n_clip = sum(p.numel() for p in params)
    timm, _ = import_timm()
    loops = {"eager": timm_adaptive_clip_grad}
    if timm is not None:
        from timm.utils.agc import adaptive_clip_grad

        loops = {"timm": adaptive_clip_grad, **loops}
    reference = reference_provider(loops)

    def restore():
        for p, g in zip(params, grads0):
            p.grad.copy_(g)

    rows = []

    def record(case, provider, fn, nbytes):
        t = time_ms(fn, device, **reps)
        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
        rows.append({"case": case, "provider": provider, **t, "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs})
        print(f"{case:12s} {provider:24s} {sig(t['ms']):>7s} ms  (p20 {sig(t['ms_p20'])}, p80 {sig(t['ms_p80'])})  "
              f"{gbs:8.1f} GB/s  {gbs / copy_gbs:5.2f} of copy bandwidth")

    agc_bytes = 3 * n_clip * itemsize
    for name, loop in loops.items():
        record(AGC_CASE, name, lambda loop=loop: (restore(), loop(params, clip_factor=0.01, eps=1e-3)), agc_bytes)
    nfk_backends = ["torch"] if device.type == "cpu" else ["triton"] + (["cuda"] if _backend.cuda_extension_usable() else [])
    for backend in nfk_backends:
        def run_agc(backend=backend):
            restore()
            with nfk.use_backend(backend):
                nfk.agc_(params)
        record(AGC_CASE, f"nfkernels {backend}", run_agc, agc_bytes)

    sgd_bytes = 5 * n_clip * itemsize
    for name, loop in loops.items():
        ref_params = make_params(clip_shapes, device, dtype)
        ref_opt = torch.optim.SGD(ref_params, lr=1e-3, momentum=0.9, nesterov=True)
        record(SGD_CASE, name, lambda loop=loop, ps=ref_params, opt=ref_opt: (
            loop(ps, clip_factor=0.01, eps=1e-3), opt.step()), sgd_bytes)
    if fused_sgd_available(device):
        fused_params = make_params(clip_shapes, device, dtype)
        fused_opt = torch.optim.SGD(fused_params, lr=1e-3, momentum=0.9, nesterov=True, fused=True)
        record(SGD_CASE, "torch SGD fused, no AGC", fused_opt.step, sgd_bytes)
    for backend in nfk_backends:
        ours = nfk.optim.SGD_AGC(make_params(clip_shapes, device, dtype), lr=1e-3)

        def run_step(opt=ours, backend=backend):
            with nfk.use_backend(backend):
                opt.step()
        record(SGD_CASE, f"nfkernels {backend}", run_step, sgd_bytes)
    for case in (AGC_CASE, SGD_CASE):
        ref_ms = next(r["ms"] for r in rows if r["case"] == case and r["provider"] == reference)
        for r in rows:
            if r["case"] == case:
                r["speedup_vs_ref"] = ref_ms / r["ms"]

    geometry = launch_geometry(clip_shapes, itemsize)
    print(f"fused launch: {geometry['units']} units ({geometry['single_element_units']} single elements), "
          f"{geometry['triton_programs']} Triton programs, {geometry['active_lanes']:.1%} of their lanes busy")
    meta = {**environment(device), "dtype": args.dtype, "shapes": "F0 / 4 (quick)" if quick else "F0",
            "clipped_params_M": round(n_clip / 1e6, 3), "copy_GB/s": copy_gbs,
            **{f"launch_{k}": v for k, v in geometry.items()},
            "note": "agc_ rows include restoring the gradients (one copy of G) in every call"}
    path = write_results("agc" + ("_quick" if quick else ""), rows, COLUMNS, meta, device, notes=NOTES,
                         reference=reference)
    print(f"bench_agc on {device_name(device)}: results in {path}")
    return rows


if __name__ == "__main__":
    main()
