"""Timing, bandwidth and reporting helpers shared by the benchmarks (DESIGN.md §7).

On a CUDA device times come from CUDA events (``triton.testing.do_bench``) as the median with
20th/80th percentiles; on a CPU from ``time.perf_counter`` around synchronous calls. Bandwidth is
reported against a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 10) -> dict[str, float]:
    """Median, 20th and 80th percentile of one call of ``fn`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the numbers
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Achieved GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t["ms"] * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def environment(device: torch.device) -> dict[str, str]:
    import triton

    import nfkernels

    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "nfkernels": nfkernels.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda or ""
    return env


def write_plot(name: str, rows: list[dict], label_key: str, value_key: str, title: str,
               device: torch.device) -> Path | None:
    """A horizontal bar chart bench/results/<name>_<device>.png of ``value_key`` per ``label_key``
    (skipped, with a note, where matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot for {name}: matplotlib is not installed)")
        return None
    labels = [str(r[label_key]) for r in rows]
    values = [r[value_key] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlabel(value_key)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}_{device_slug(device)}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict, device: torch.device) -> Path:
    """Write bench/results/<name>_<device>.json and .md; returns the markdown path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{name}_{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = f"# {name} on {meta.get('device', device_name(device))}\n\n"
    header += ", ".join(f"{k} {v}" for k, v in meta.items() if k != "device") + "\n\n"
    stem.with_suffix(".md").write_text(header + markdown_table(rows, columns) + "\n")
    return stem.with_suffix(".md")


def nfnet_on_meta(variant: str = "f0", width_div: int = 1) -> torch.nn.Module:
    """NFNet-``variant`` on the meta device (shapes without memory), channels divided by width_div."""
    from nfkernels.models import nfnet

    overrides = {}
    if width_div > 1:
        overrides = dict(channels=tuple(c // width_div for c in (256, 512, 1536, 1536)), stem_chs=128 // width_div,
                         group_size=max(1, 128 // width_div), num_features=3072 // width_div)
    with torch.device("meta"):
        return nfnet(variant, **overrides)


def nfnet_f0_conv_shapes() -> list[tuple[int, ...]]:
    """Weight shapes of every weight-standardized conv in NFNet-F0 (timm dm_nfnet_f0), in order."""
    from nfkernels.nn import WSConv2d

    return [tuple(m.weight.shape) for m in nfnet_on_meta("f0").modules() if isinstance(m, WSConv2d)]


def nfnet_f0_activation_shapes(batch: int, resolution: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(name, NCHW shape) of the residual-branch activations of NFNet-F0's stages at an input size."""
    out = []
    res = resolution // 4
    for stage, (out_chs, stride) in enumerate(zip((256, 512, 1536, 1536), (1, 2, 2, 2))):
        res = -(-res // stride)
        out.append((f"stage{stage}_mid", (batch, out_chs // 2, res, res)))
        out.append((f"stage{stage}_out", (batch, out_chs, res, res)))
    return out


def run_providers(case: str, providers: dict[str, Callable[[], object]], nbytes: int, device: torch.device,
                  copy_gbs: float, reference: str) -> list[dict]:
    """Time each provider on one case; rows carry ms, GB/s, fraction of copy bandwidth, speedup."""
    rows = []
    for name, fn in providers.items():
        t = time_ms(fn, device)
        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
        rows.append({"case": case, "provider": name, **t, "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs,
                     "peak_MB": peak_memory_mb(fn, device)})
    ref_ms = next((r["ms"] for r in rows if r["provider"] == reference), None)
    for r in rows:
        r["speedup_vs_ref"] = ref_ms / r["ms"] if ref_ms else None
    return rows


COLUMNS = ["case", "provider", "ms", "ms_p20", "ms_p80", "GB/s", "frac_copy_bw", "speedup_vs_ref", "peak_MB"]


def nfkernels_impls(fn: Callable, probe_args: tuple) -> dict[str, Callable]:
    """``fn`` under each nfkernels backend that runs here, named "nfkernels <backend>": triton and
    cuda (when the extension serves the op: one probe call with ``probe_args`` decides) on a GPU,
    the torch path on a CPU."""
    import nfkernels

    if bench_device().type == "cpu":
        backends = ["torch"]
    else:
        backends = ["triton"]
        try:
            with torch.no_grad(), nfkernels.use_backend("cuda"):
                fn(*probe_args)
            backends.append("cuda")
        except RuntimeError as err:  # no extension, or no CUDA kernel for this op
            print(f"  (no 'nfkernels cuda' row: {err})")

    def under(backend):
        def run(*args):
            with nfkernels.use_backend(backend):
                return fn(*args)
        return run

    return {f"nfkernels {b}": under(b) for b in backends}


def forward_only(fn: Callable, *args) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*args)
    return run


def forward_backward(fn: Callable, *args, grad: torch.Tensor) -> Callable[[], None]:
    def run():
        fn(*args).backward(grad)
    return run


def compare_fwd_and_bwd(case: str, impls: dict[str, Callable], args: tuple, grad: torch.Tensor, fwd_bytes: int,
                        fwd_bwd_bytes: int, device: torch.device, copy_gbs: float) -> list[dict]:
    """Time each implementation's forward (no grad) and forward+backward against "eager"."""
    rows = run_providers(f"{case} fwd", {n: forward_only(f, *args) for n, f in impls.items()}, fwd_bytes, device,
                         copy_gbs, "eager")
    rows += run_providers(f"{case} fwd+bwd", {n: forward_backward(f, *args, grad=grad) for n, f in impls.items()},
                          fwd_bwd_bytes, device, copy_gbs, "eager")
    return rows


def activation_bench_setup(description: str, argv=None) -> argparse.Namespace:
    """Command line and defaults shared by the activation-shaped benchmarks: on a GPU bf16, batch
    32 at 192 px (the paper's F0 training setting); on a CPU (or --quick) fp32, batch 2 at 64 px."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (default on CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (GPU), 2 (CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 192 (GPU), 64 (CPU)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    args.device = bench_device()
    args.quick = args.quick or args.device.type == "cpu"
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device.type == "cpu" else "bfloat16"))
    args.batch = args.batch or (2 if args.quick else 32)
    args.resolution = args.resolution or (64 if args.quick else 192)
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    args.esize = torch.tensor([], dtype=args.dtype).element_size()
    args.copy_gbs = copy_bandwidth_gbs(args.device)
    return args


def activation_bench_meta(args: argparse.Namespace) -> dict:
    import nfkernels

    return {**environment(args.device), "dtype": str(args.dtype).replace("torch.", ""), "batch": args.batch,
            "resolution": args.resolution, "memory_format": "channels_last" if args.channels_last else "NCHW",
            "backend": nfkernels.get_backend(), "copy_GB/s": args.copy_gbs, "cpu_fallback": args.device.type == "cpu"}
