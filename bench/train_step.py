"""The training step of NFNet: forward, backward, AGC and SGD, timed the paper's way (median of
many steps after warm-up, data already on the device; Brock et al. 2021, Table 3 reports F0 at
56.7 ms/step on a V100, fp16, batch 32).

Providers, all on the same weights and data:
  reference                timm's model (dm_nfnet_fX, or timm's model of the --model name; for tiny a
                           NormFreeNet of the same configuration) + timm's AGC + torch.optim.SGD
                           (nesterov) when timm imports;
                           else nfkernels' model on its plain-torch backend (the same unfused ops) +
                           timm's AGC loop written out + torch.optim.SGD
  reference torch.compile  the same with the model compiled
  nfkernels                the fused kernels (backend "auto") + SGD_AGC
  nfkernels torch.compile  the same with the model compiled (fullgraph)
  nfkernels CUDA graph     the whole nfkernels step captured once and replayed (GPU only)

    python -m bench.train_step [--variant f0 | --model eca_nfnet_l0] [--batch 32] [--resolution 192]
                               [--dtype bfloat16] [--channels-last] [--steps 50] [--quick]

``--model`` takes any of timm's NormFreeNet names that nfkernels builds (nfkernels.models.MODEL_NAMES:
eca_nfnet_l0, nfnet_l0, nf_regnet_b1, nf_resnet50, …); its resolution defaults to timm's training
size for that model (pretrained_cfg input_size).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.bench_agc import timm_adaptive_clip_grad
from bench.common import bench_device, environment, import_timm, sig, write_results
from bench.train_nfnet import TINY
from nfkernels.models import MODEL_NAMES, TIMM_NAMES, VARIANTS, NFNet, nfnet, pretrained_cfg_for
from nfkernels.training import CUDAGraphTrainStep

COLUMNS = ["provider", "ms", "ms_p20", "ms_p80", "images/s", "speedup_vs_ref", "peak_MB", "loss_step0"]
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 2e-5


def timm_model(variant: str, num_classes: int):
    """(timm's model for ``variant``, its name), or (None, why not) where timm does not import. For
    tiny, timm's NormFreeNet with TINY's configuration (the dm_nfnet style: deep_quad stem, gamma in
    the activation, SAME padding, SkipInit), whose state dict matches nfkernels' names and shapes."""
    timm, about = import_timm()
    if timm is None:
        return None, about
    if variant == "tiny":
        from timm.models.nfnet import NfCfg, NormFreeNet

        c = TINY
        cfg = NfCfg(depths=c.depths, channels=c.channels, alpha=c.alpha, stem_type="deep_quad", stem_chs=c.stem_chs,
                    group_size=c.group_size, attn_layer="se", attn_kwargs=dict(rd_ratio=c.se_rd_ratio),
                    attn_gain=c.attn_gain, bottle_ratio=c.bottle_ratio, num_features=c.num_features,
                    ch_div=c.ch_div, extra_conv=c.extra_conv, gamma_in_act=True, same_padding=c.same_padding,
                    std_conv_eps=c.std_conv_eps, skipinit=c.skipinit, act_layer=c.act)
        return NormFreeNet(cfg, num_classes=num_classes), "timm NormFreeNet (tiny configuration)"
    name = TIMM_NAMES[variant] if variant in VARIANTS else variant
    if name is None:  # timm's nfnet_f7 is another design (nfkernels.models.nfnet docstring)
        return None, f"timm has no dm_nfnet_{variant}"
    return timm.create_model(name, num_classes=num_classes), f"timm {name}"


def build_models(variant: str, num_classes: int, device, memory_format):
    """(nfkernels model, reference model, reference label) with identical weights."""
    ours = NFNet(TINY, num_classes=num_classes) if variant == "tiny" else nfnet(variant, num_classes)
    ref, label = timm_model(variant, num_classes)
    if ref is None:
        label = f"nfkernels model on its torch backend ({label})"
        ref = NFNet(TINY, num_classes=num_classes) if variant == "tiny" else nfnet(variant, num_classes)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours = ours.to(device, memory_format=memory_format).train()
    ref = ref.to(device, memory_format=memory_format).train()
    return ours, ref, label


def reference_clip(model):
    """(timm's adaptive_clip_grad, or its loop written out where timm does not import; the
    parameters it clips: all but the classifier)."""
    timm, _ = import_timm()
    if timm is not None:
        from timm.utils.agc import adaptive_clip_grad
    else:
        adaptive_clip_grad = timm_adaptive_clip_grad
    return adaptive_clip_grad, [p for n, p in model.named_parameters() if not n.startswith("head.fc")]


def reference_step_fn(model, amp_dtype, torch_backend: bool):
    adaptive_clip_grad, params = reference_clip(model)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.endswith("gain")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and not n.endswith("gain"))]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=LR, momentum=MOMENTUM, nesterov=True)

    def step(x, y):
        ctx = nfk.use_backend("torch") if torch_backend else contextlib.nullcontext()
        with ctx, torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3)
        opt.step()
        return loss.detach()
    return step


def nfkernels_step_fn(model, amp_dtype):
    opt = nfk.optim.SGD_AGC(nfk.optim.nfnet_param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM,
                            nesterov=True, clip_factor=0.01, eps=1e-3)

    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)  # gradients stay in place: the fused step's row table is reused
        loss.backward()
        opt.step()
        return loss.detach()
    return step, opt


def provider_notes(ref_label: str) -> dict[str, str]:
    """What each provider of this run is, with the reference actually used."""
    if ref_label.startswith("timm"):
        reference = f"{ref_label} + timm's adaptive_clip_grad + torch.optim.SGD (nesterov), eager"
    else:
        reference = ("nfkernels' model on its plain-PyTorch backend (timm does not import here; the same unfused "
                     "ops) + timm's AGC loop written out + torch.optim.SGD (nesterov), eager")
    return {
        "reference": reference,
        "reference torch.compile": "the reference with its model compiled by torch.compile",
        "nfkernels": "nfkernels' NFNet with its fused kernels (backend 'auto': the torch path on a CPU) + SGD_AGC",
        "nfkernels torch.compile": "the same with the model compiled by torch.compile (fullgraph)",
        "nfkernels CUDA graph": "the whole nfkernels step captured once as a CUDA graph and replayed (GPU only)",
    }


def time_steps(step, x, y, device, warmup: int, steps: int) -> tuple[dict, float]:
    """Per-step times (CUDA events on a GPU) after warm-up; returns the timing and the first loss."""
    first_loss = float(step(x, y))
    for _ in range(warmup - 1):
        step(x, y)
    samples = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x, y)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(x, y)
            samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}, first_loss


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--variant", default=None, choices=["tiny"] + [f"f{i}" for i in range(8)],
                       help="NFNet-F in DeepMind's design (timm's dm_nfnet_fX); default f0 (GPU), tiny (CPU)")
    which.add_argument("--model", default=None, choices=MODEL_NAMES, metavar="NAME",
                       help="any timm NormFreeNet name nfkernels builds, e.g. eca_nfnet_l0, nf_regnet_b1, nf_resnet50")
    parser.add_argument("--batch", type=_positive, default=None, help="default 32 (GPU), 4 (CPU)")
    parser.add_argument("--resolution", type=_positive, default=None,
                        help="default 192 (GPU; --model: timm's training size), 32 (CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype; default bfloat16 (GPU), float32 = no autocast (CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=_positive, default=None, help="timed steps; default 50 (GPU), 5 (CPU)")
    parser.add_argument("--warmup", type=_positive, default=None,
                        help="untimed steps first (the first one's loss is recorded); default 10 (GPU), 2 (CPU)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (default on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type == "cpu"
    variant = args.model or args.variant or ("tiny" if quick else "f0")
    batch = args.batch or (4 if quick else 32)
    default_resolution = pretrained_cfg_for(variant)["input_size"][-1] if args.model else 192
    resolution = args.resolution or (32 if quick else default_resolution)
    dtype_name = args.dtype or ("float32" if quick else "bfloat16")
    amp_dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    steps = args.steps if args.steps is not None else (5 if quick else 50)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    compile_too = not (quick or args.no_compile)
    if device.type == "cpu":
        print("train_step: no CUDA device, CPU fallback (tiny model; nfkernels runs its torch path on CPU, so "
              "this compares the optimizers and the composition, not the fused GPU kernels)")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    results = []

    def record(name, step):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timing, loss0 = time_steps(step, x, y, device, warmup, steps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        results.append({"provider": name, **timing, "images/s": batch / (timing["ms"] * 1e-3), "peak_MB": peak,
                        "loss_step0": loss0})
        print(f"  {name:28s} {sig(timing['ms']):>7s} ms/step  {batch / (timing['ms'] * 1e-3):8.1f} img/s", flush=True)

    # Every provider starts from the same weights: fresh copies of these two.
    ours0, ref0, ref_label = build_models(variant, 1000, device, memory_format)
    torch_backend = not ref_label.startswith("timm")
    label = variant if args.model else f"NFNet-{variant}"
    print(f"train_step: {label}, batch {batch}, {resolution}px, {dtype_name}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, reference = {ref_label}")
    record("reference", reference_step_fn(copy.deepcopy(ref0), amp_dtype, torch_backend))
    if compile_too:
        record("reference torch.compile",
               reference_step_fn(torch.compile(copy.deepcopy(ref0)), amp_dtype, torch_backend))
    record("nfkernels", nfkernels_step_fn(copy.deepcopy(ours0), amp_dtype)[0])
    if compile_too:
        record("nfkernels torch.compile",
               nfkernels_step_fn(torch.compile(copy.deepcopy(ours0), fullgraph=True), amp_dtype)[0])
    if device.type == "cuda":
        model = copy.deepcopy(ours0)
        _, opt = nfkernels_step_fn(model, amp_dtype)
        record("nfkernels CUDA graph", CUDAGraphTrainStep(model, opt, F.cross_entropy, x, y, amp_dtype=amp_dtype))

    ref_ms = results[0]["ms"]
    for r in results:
        r["speedup_vs_ref"] = ref_ms / r["ms"]
    meta = {**environment(device), "variant": variant, "batch": batch, "resolution": resolution,
            "dtype": dtype_name, "memory_format": "channels_last" if args.channels_last else "NCHW",
            "reference": ref_label, "steps": steps, "warmup": warmup, "cpu_fallback": device.type == "cpu"}
    name = f"train_step_{variant}_{meta['memory_format'].lower()}"
    path = write_results(name, results, COLUMNS, meta, device, notes=provider_notes(ref_label), case_key=None,
                         reference="reference", unit="time per training step")
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()
