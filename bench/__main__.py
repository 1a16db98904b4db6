"""The main job: every per-op benchmark, on the GPU in full, on a CPU as a small fallback.

    python -m bench [--quick] [--only NAME ...]

Each benchmark writes bench/results/<name>_<device>.json and .md; this prints them all and a
summary of where the results went.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

# (name, module in bench/, the argument lists of its GPU runs); on a CPU each runs once, --quick.
BENCHMARKS = [
    ("weight_standardize", "bench_weight_standardize", [[]]),
    ("scaled_act", "bench_scaled_act", [[], ["--channels-last"]]),
    ("se_gate", "bench_se_gate", [[], ["--channels-last"]]),
    ("agc", "bench_agc", [[]]),
    ("train_step", "train_step", [["--variant", v] + fmt for v in ("f0", "f1") for fmt in ([], ["--channels-last"])]),
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
              "on CPU, so these numbers compare PyTorch compositions, not the fused GPU kernels).\n")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
