"""The main job: every per-op benchmark, on the GPU in full, on a CPU as a small fallback.

    python -m bench [--quick] [--only NAME ...]

Each benchmark writes bench/results/<name>_<device>.json, .md and .png (the chart where matplotlib
is installed); kernel_report, which times nothing, writes kernel_report[_quick]_sm90a.json and .md.
This prints the tables as they come and ends with a summary of every file written.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from bench import common

# (name, module in bench/, the argument lists of its GPU runs); on a CPU each runs once, --quick.
BENCHMARKS = [
    ("weight_standardize", "bench_weight_standardize", [[]]),
    ("scaled_act", "bench_scaled_act", [[], ["--channels-last"]]),
    ("se_gate", "bench_se_gate", [[], ["--channels-last"]]),
    ("agc", "bench_agc", [[]]),
    # F0 and F1 in DeepMind's design, and timm's most used pretrained NFNet (ECA, SiLU; channels_last).
    ("train_step", "train_step", [["--variant", v] + fmt for v in ("f0", "f1") for fmt in ([], ["--channels-last"])]
     + [["--model", "eca_nfnet_l0", "--channels-last"]]),
    ("step_profile", "step_profile", [[]]),
    # No timing: what the kernels of an F0 step compile to on sm_90a (needs no GPU; --quick: NCHW only).
    ("kernel_report", "kernel_report", [[]]),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="nfkernels benchmarks (main job)")
    parser.add_argument("--quick", action="store_true", help="small sizes (always on a CPU)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in BENCHMARKS],
                        help="run only these benchmarks")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("No CUDA device: running the CPU fallback (small sizes; nfkernels uses its torch backend "
              "on CPU, so these numbers compare PyTorch compositions, not the fused GPU kernels).")
    print(common.timm_line() + "\n")
    common.WRITTEN.clear()
    common.PLOTS_SKIPPED.clear()
    jobs = [(name, module, ([["--quick"]] if (args.quick or not on_gpu) else runs))
            for name, module, runs in BENCHMARKS if not args.only or name in args.only]
    total = sum(len(runs) for _, _, runs in jobs)
    done = 0
    for name, module_name, runs in jobs:
        module = importlib.import_module(f"bench.{module_name}")
        for run_args in runs:
            done += 1
            label = " ".join([name, *run_args])
            print(f"[{done}/{total}] {label} ...", flush=True)
            start = time.perf_counter()
            module.main(run_args)
            print(f"[{done}/{total}] {label} done in {time.perf_counter() - start:.1f} s\n", flush=True)
    print(summary())
    return 0


def summary() -> str:
    """What the run wrote where, the last thing a person reads."""
    files = list(dict.fromkeys(common.WRITTEN))
    lines = [f"Summary: {len(files)} files written:"]
    lines += [f"  {common.display_path(path)}" for path in files]
    if common.PLOTS_SKIPPED:
        lines.append(f"PNG charts: {len(common.PLOTS_SKIPPED)} skipped, matplotlib is not installed "
                     f"({common.MATPLOTLIB_HINT}).")
    lines.append(common.timm_line())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
