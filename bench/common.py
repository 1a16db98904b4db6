"""Timing, bandwidth and reporting helpers shared by the benchmarks (docs/design.md §7).

On a CUDA device times come from CUDA events (``triton.testing.do_bench``) as the median with
20th/80th percentiles; on a CPU from ``time.perf_counter`` around synchronous calls. Bandwidth is
reported against a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import textwrap
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
    timm, _ = import_timm()
    env["timm"] = timm.__version__ if timm is not None else "not importable"
    return env


# Every file the benchmarks of this process wrote, in order, and the benchmarks whose chart was
# skipped: the main job ends with a summary of both, which no single benchmark can print.
WRITTEN: list[Path] = []
PLOTS_SKIPPED: list[str] = []
MATPLOTLIB_HINT = "python3 -m pip install matplotlib, then run again"

# What each provider (a row's "provider") runs; a benchmark adds or overrides its own entries.
PROVIDER_NOTES = {
    "eager": "timm's PyTorch code for the op, written out in bench/ and run op by op in eager mode: "
             "the unfused reference",
    "timm": "timm's own module or function, imported and run in eager mode: the reference wherever timm imports",
    "torch.compile": "the eager code compiled by torch.compile (Inductor, default mode; GPU runs only)",
    "nfkernels triton": "nfkernels' fused Triton kernel (backend 'triton')",
    "nfkernels cuda": "nfkernels' fused CUDA C++ kernel from its compiled extension (backend 'cuda')",
    "nfkernels torch": "nfkernels' plain-PyTorch path (backend 'torch'), what runs on a CPU: unfused, so it "
                       "compares PyTorch compositions, not the kernels",
}

# How a column is rounded for people (.md tables, printed lines); the JSON keeps every digit.
_ONE_DECIMAL = {"GB/s", "copy_GB/s", "peak_MB", "images/s"}
_TWO_DECIMALS = {"frac_copy_bw", "speedup_vs_ref"}


def sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits without an exponent (1234 -> "1230", 0.0004658 ->
    "0.000466"): times span microseconds to seconds and a fixed number of decimals suits neither."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if math.floor(math.log10(abs(rounded))) != math.floor(math.log10(abs(value))):
        decimals -= 1  # 999.7 rounds up to 1000: one digit fewer after the point
        rounded = round(value, decimals)
    return f"{rounded:.{max(decimals, 0)}f}"


def fmt(column: str, value) -> str:
    """A cell as a person reads it: ms to 3 significant digits, GB/s, MB and images/s to 0.1,
    ratios to 0.01 (0.1 from 100 up), losses to 0.001; other floats to 3 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if column in _ONE_DECIMAL:
        return f"{value:.1f}"
    if column in _TWO_DECIMALS:  # to 0.01; from 100 up, 0.1 (five digits would claim too much)
        return f"{value:.2f}" if abs(value) < 99.995 else f"{value:.1f}"
    if column.startswith("loss"):
        return f"{value:.3f}"
    return sig(value)


def display_path(path: Path) -> str:
    """``path`` relative to the current directory where it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def import_timm():
    """(timm, "timm <version>") or (None, why not): the references are timm's own code only where
    timm imports, and the output says which they are."""
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - timm needs torchvision, which may be missing or broken
        return None, f"{type(err).__name__}: {err}"
    return timm, f"timm {timm.__version__}"


def timm_line() -> str:
    """One line for the output: what the reference providers are on this machine."""
    timm, about = import_timm()
    if timm is not None:
        return (f"{about} imports: timm's own modules are the reference provider ('timm') where timm has one for "
                "the op, and timm's model is the training step's 'reference'.")
    return (f"timm does not import here ({about}): the references are timm's code written out in bench/ "
            "('eager') and nfkernels' model on its torch backend; install timm (it needs torchvision) to "
            "compare with timm itself.")


def write_plot(stem: Path, rows: list[dict], title: str, notes: dict[str, str], *, case_key: str | None = "case",
               unit: str = "time per call") -> Path | None:
    """<stem>.png: the median of each provider per case, whiskers from p20 to p80, the providers
    explained under the chart. Returns None, after saying so, where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"  (PNG chart skipped for {stem.name}: matplotlib is not installed; {MATPLOTLIB_HINT})")
        PLOTS_SKIPPED.append(stem.name)
        return None
    cases = list(dict.fromkeys(str(r[case_key]) for r in rows)) if case_key else [unit.removeprefix("time per ")]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    caption = "Providers:\n" + "\n".join(
        textwrap.fill(f"{p}: {notes.get(p, '')}", 130, subsequent_indent="    ") for p in providers)
    caption_lines = caption.count("\n") + 1
    slot = len(providers) + 1  # one row per provider and a gap between cases
    plot_h = 0.16 * len(cases) * slot + 1.0
    caption_h = 0.12 * caption_lines + 0.1
    fig = Figure(figsize=(10, plot_h + caption_h + 0.5))
    ax = fig.add_subplot()
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    low = min(r["ms_p20"] for r in rows)
    high = max(r["ms_p80"] for r in rows)
    for j, provider in enumerate(providers):
        mine = [(i, r) for i, case in enumerate(cases) for r in rows
                if r["provider"] == provider and (not case_key or str(r[case_key]) == case)]
        ys = [i * slot + j for i, _ in mine]
        ms = [r["ms"] for _, r in mine]
        err = [[max(r["ms"] - r["ms_p20"], 0.0) for _, r in mine], [max(r["ms_p80"] - r["ms"], 0.0) for _, r in mine]]
        ax.errorbar(ms, ys, xerr=err, fmt="o", ms=4, capsize=2.5, lw=1, color=colors[j % len(colors)], label=provider)
        for y, (_, r) in zip(ys, mine):
            ax.annotate(sig(r["ms"]), (r["ms_p80"], y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=6.5)
    if high > 30 * low > 0:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")  # cases differ by orders of magnitude: each stays readable
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.set_xlim(left=0)  # from zero, so that lengths compare as ratios
    ax.set_yticks([i * slot + (len(providers) - 1) / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_ylim(len(cases) * slot - 1, -1)
    ax.set_xlabel(f"{unit}, ms: median, whiskers p20 to p80 (lower is better)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", ha="left", family="monospace")
    fig.tight_layout(rect=(0, caption_h / (plot_h + caption_h + 0.5), 1, 1))
    path = stem.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def explain_columns(columns: list[str], reference: str, unit: str) -> str:
    """The paragraph over a table that says what its numbers are."""
    parts = [f"`ms` is the {unit} in milliseconds: the median over repeated runs, `ms_p20`/`ms_p80` the 20th and "
             "80th percentiles; lower is better."]
    if "GB/s" in columns:
        parts.append("`GB/s` counts the bytes the op must move at least (each input read once, each output "
                     "written once); `frac_copy_bw` is that over a device-to-device copy measured in the same run.")
    if "images/s" in columns:
        parts.append("`images/s` is the batch over the median step time.")
    if "speedup_vs_ref" in columns:
        parts.append(f"`speedup_vs_ref` is the median of `{reference}` over this row's (above 1: faster).")
    if "launches" in columns:
        parts.append("`launches` counts the kernel, memcpy and memset launches torch.profiler records (GPU "
                     "only); `device_ops` counts each aten op that does device work (views, allocations and "
                     "metadata excluded) and each nfkernels kernel launch, at dispatch, on any machine.")
    if "peak_MB" in columns:
        parts.append("`peak_MB` is the peak CUDA memory allocated during a run (GPU only).")
    if "loss_step0" in columns:
        parts.append("`loss_step0` is the loss of the first step: the same for every provider, as they start "
                     "from the same weights and batch.")
    return " ".join(parts)


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict, device: torch.device, *,
                  notes: dict[str, str] | None = None, case_key: str | None = "case", reference: str | None = None,
                  unit: str = "time per call", appendix: str = "") -> Path:
    """Write bench/results/<name>_<device>.json, .png (where matplotlib is installed) and .md, with
    the providers explained and ``appendix`` (markdown) at the end; returns the markdown path.
    Rows whose ``ms`` is None (not measured) are in the tables, not in the chart."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{name}_{device_slug(device)}"
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    notes = {p: {**PROVIDER_NOTES, **(notes or {})}.get(p, "") for p in providers}
    reference = reference or (providers[0] if providers else "")
    title = f"{name} on {meta.get('device', device_name(device))}"
    timed = [r for r in rows if r.get("ms") is not None]
    png = write_plot(stem, timed, title, notes, case_key=case_key, unit=unit) if timed else None
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "providers": notes, "rows": rows}, indent=2)
                                         + "\n")
    md = [f"# {title}", "", ", ".join(f"{k} {fmt(k, v)}" for k, v in meta.items() if k != "device"), "",
          explain_columns(columns, reference, unit), ""]
    if png is not None:
        md += [f"![{name}]({png.name})", ""]
    md += [markdown_table(rows, columns), "", "Providers:", ""]
    md += [f"- **{p}**: {note}" for p, note in notes.items()]
    if appendix:
        md += ["", appendix]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    WRITTEN.extend(p for p in (stem.with_suffix(".json"), stem.with_suffix(".md"), png) if p is not None)
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
    """Time each implementation's forward (no grad) and forward+backward against the reference:
    "timm" where timm imports, else "eager"."""
    ref = reference_provider(impls)
    rows = run_providers(f"{case} fwd", {n: forward_only(f, *args) for n, f in impls.items()}, fwd_bytes, device,
                         copy_gbs, ref)
    rows += run_providers(f"{case} fwd+bwd", {n: forward_backward(f, *args, grad=grad) for n, f in impls.items()},
                          fwd_bwd_bytes, device, copy_gbs, ref)
    return rows


def reference_provider(providers) -> str:
    """The provider speedups are measured against: timm's own code where it ran, else "eager"."""
    return "timm" if "timm" in providers else "eager"


def activation_bench_setup(description: str, argv=None) -> argparse.Namespace:
    """Command line and defaults shared by the activation-shaped benchmarks: on a GPU bf16, batch
    32 at 192 px (the paper's F0 training setting); on a CPU (or --quick) fp32, batch 2 at 64 px."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
