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

BENCHMARKS = ["weight_standardize", "scaled_act", "se_gate", "agc"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="nfkernels benchmarks (main job)")
    parser.add_argument("--quick", action="store_true", help="small sizes (always on a CPU)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("No CUDA device: running the CPU fallback (small sizes; nfkernels uses its torch backend "
              "on CPU, so these numbers compare PyTorch compositions, not the fused GPU kernels).\n")
    names = args.only or BENCHMARKS
    for i, name in enumerate(names, 1):
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        start = time.perf_counter()
        module.main(["--quick"] if (args.quick or not on_gpu) else [])
        print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - start:.1f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
