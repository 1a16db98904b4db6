"""The host cost of an NFNet training step: kernel launches per step (forward, backward,
optimizer; by op) and host milliseconds per step, for the reference and for nfkernels (issue 12).

    python -m bench.step_profile [--variant f0] [--batch 32] [--resolution 192] [--dtype bfloat16]
                                 [--steps 20] [--quick]

Providers, on the same weights and batch (bench/train_step.py builds them):
  reference                 timm's model + timm's adaptive_clip_grad + torch.optim.SGD (nesterov),
                            zero_grad() with torch's default set_to_none=True (on a machine where
                            timm does not import: nfkernels' model on its torch backend, the same ops)
  nfkernels                 the fused model + SGD_AGC, zero_grad() as torch's default (new gradients
                            every step)
  nfkernels, grads kept     the same with zero_grad(set_to_none=False) (gradients stay in place)
and, alone, each optimizer on the same model's gradients: ``SGD_AGC.step()``, ``agc_`` and the
reference's clip + ``SGD.step()``.

Launches. On a GPU, torch.profiler's kernel, memcpy and memset launches in each phase. On every
machine, ``device ops``: each aten op that does device work (views, allocations and metadata
excluded) plus each launch of an nfkernels kernel, counted at dispatch, by op.

Host ms. The time each phase takes to return to Python, the median over ``--steps`` steps. On a
GPU the device's queue is drained before every step, so this is what the host spends issuing the
step (a queue longer than about a thousand launches can still make the host wait). On a CPU,
nfkernels runs its Triton backend with every kernel launch replaced by a no-op through the launch
path all its ops share (``nfkernels.ops._library.observe_launches(run=False)``), so the same
Python, autograd and dispatch run as on a GPU; torch's own ops (the convolutions, the loss) still
compute on the CPU and are in the numbers, the same work before and after a change to nfkernels.
The reference's every op computes on a CPU: its host time is not measured there.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nfkernels as nfk
from bench.common import bench_device, device_slug, environment, sig, write_results
from bench.train_step import LR, MOMENTUM, WEIGHT_DECAY, build_models
from nfkernels import _backend
from nfkernels.ops import _library

COLUMNS = ["provider", "phase", "launches", "device_ops", "ms", "ms_p20", "ms_p80"]
PHASES = ("forward", "backward", "optimizer")
NAME = "step_profile"

# Aten ops that do no device work of their own: allocation, metadata, aliasing (views are found by
# is_view), and composites that only ever work through the ops they call (a no-op when they call none).
NO_DEVICE_WORK = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::is_same_size",
    "aten::_has_compatible_shallow_copy_type", "aten::record_stream", "aten::result_type", "aten::size",
    "aten::stride", "aten::is_nonzero", "aten::_nnz", "aten::as_strided_", "aten::set_data",
    "aten::contiguous", "aten::to", "aten::reshape", "aten::flatten", "aten::unflatten", "aten::type_as",
    "aten::view_as", "aten::expand_as",
}


@functools.lru_cache(maxsize=None)
def does_device_work(name: str) -> bool:
    """Whether the aten op ``name`` ("aten::add_") launches device work: not a view (any overload),
    not an allocation or a metadata query."""
    if name in NO_DEVICE_WORK:
        return False
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return True
    return not any(getattr(packet, overload).is_view for overload in packet.overloads())


def _aten(event) -> bool:
    return event.name.startswith("aten::")


def _does_work(event) -> bool:
    """Whether ``event`` (an aten op) launches device work: itself, or an op it calls. Only the
    outermost aten op of a call is counted, once, as on a GPU (aten::sum is one kernel there; on
    a CPU it also calls fill_)."""
    return does_device_work(event.name) or any(_does_work(c) for c in event.cpu_children if _aten(c))


def device_op_counts(provider: "Provider", launches_run: bool) -> collections.Counter:
    """(phase, op) -> count over one step, from torch.profiler's record of every op: each aten op
    called from outside aten (Python, autograd, an nfkernels op) that does device work (``_does_work``),
    and each nfkernels kernel launch."""
    from torch.profiler import ProfilerActivity, profile, record_function

    launched: collections.Counter = collections.Counter()
    with _library.observe_launches(lambda kernel: launched.update([(_current_phase, kernel)]), run=launches_run):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_step(provider, lambda phase: record_function(f"step_profile:{phase}"))
    events = prof.events()
    spans = _phase_spans(events)
    counts: collections.Counter = collections.Counter()
    for e in events:
        if not _aten(e) or (e.cpu_parent is not None and _aten(e.cpu_parent)) or not _does_work(e):
            continue
        phase = _phase_of(spans, e.time_range.start)
        if phase is not None:
            counts[(phase, e.name)] += 1
    for (phase, kernel), n in launched.items():
        counts[(phase, f"nfkernels kernel {kernel}")] += n
    return counts


class Provider:
    """One training step split into its phases: ``forward() -> loss``, ``backward(loss)``,
    ``optimizer()`` (zero_grad is the optimizer's: the next backward depends on it)."""

    def __init__(self, name, model, x, y, amp_dtype, optimizer_step, zero_grad, backend="auto"):
        self.name, self.model, self.x, self.y, self.amp_dtype = name, model, x, y, amp_dtype
        self.optimizer_step, self.zero_grad, self.backend = optimizer_step, zero_grad, backend

    def forward(self):
        with nfk.use_backend(self.backend), torch.autocast(self.x.device.type, dtype=self.amp_dtype,
                                                           enabled=self.amp_dtype is not None):
            return F.cross_entropy(self.model(self.x), self.y)

    def backward(self, loss):
        with nfk.use_backend(self.backend):
            loss.backward()

    def optimizer(self):
        with nfk.use_backend(self.backend):
            self.optimizer_step()
            self.zero_grad()


def reference_provider(model, x, y, amp_dtype, torch_backend: bool) -> Provider:
    from bench.train_step import reference_clip

    clip, params = reference_clip(model)
    opt = reference_sgd(model)

    def step():
        clip(params, clip_factor=0.01, eps=1e-3)
        opt.step()

    return Provider("reference", model, x, y, amp_dtype, step, lambda: opt.zero_grad(set_to_none=True),
                    backend="torch" if torch_backend else "auto")


def reference_sgd(model) -> torch.optim.SGD:
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.endswith("gain")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and not n.endswith("gain"))]
    return torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=LR, momentum=MOMENTUM, nesterov=True)


def nfkernels_provider(name, model, x, y, amp_dtype, set_to_none: bool, backend: str) -> Provider:
    opt = nfk.optim.SGD_AGC(nfk.optim.nfnet_param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM,
                            nesterov=True, clip_factor=0.01, eps=1e-3)
    provider = Provider(name, model, x, y, amp_dtype, opt.step, lambda: opt.zero_grad(set_to_none=set_to_none),
                        backend=backend)
    provider.opt = opt
    return provider


def run_step(provider: Provider, phase_context=None) -> dict[str, float]:
    """One step; host seconds per phase. ``phase_context(phase)``, if given, is entered around
    each phase (the profiler's labels)."""
    global _current_phase
    seconds = {}
    loss = None
    for phase in PHASES:
        context = phase_context(phase) if phase_context is not None else contextlib.nullcontext()
        _current_phase = phase
        start = time.perf_counter()
        with context:
            if phase == "forward":
                loss = provider.forward()
            elif phase == "backward":
                provider.backward(loss)
            else:
                provider.optimizer()
        seconds[phase] = time.perf_counter() - start
    return seconds


_current_phase = PHASES[0]  # the phase run_step is in, for the launch counter


def _phase_spans(events) -> dict[str, tuple[float, float]]:
    return {e.name.split(":", 1)[1]: (e.time_range.start, e.time_range.end)
            for e in events if e.name.startswith("step_profile:")}


def _phase_of(spans: dict[str, tuple[float, float]], t: float) -> str | None:
    for phase, (start, end) in spans.items():
        if start <= t <= end:
            return phase
    return None


def drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_times(provider: Provider, device, steps: int, launches_run: bool) -> dict[str, list[float]]:
    """Host ms per phase and per step over ``steps`` steps after two warm-up steps."""
    samples = collections.defaultdict(list)
    observe = _library.observe_launches(lambda kernel: None, run=launches_run)
    with observe:
        for i in range(steps + 2):
            drain(device)
            seconds = run_step(provider)
            if i >= 2:
                for phase, s in seconds.items():
                    samples[phase].append(s * 1e3)
                samples["step"].append(sum(seconds.values()) * 1e3)
    drain(device)
    return samples


LAUNCH_EVENTS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaLaunchCooperativeKernel", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch"}


def profiled_launches(provider: Provider) -> dict[str, int]:
    """Launches per phase from torch.profiler (GPU): the runtime's launch calls in each phase."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step(provider, lambda phase: record_function(f"step_profile:{phase}"))
        torch.cuda.synchronize()
    events = prof.events()
    spans = _phase_spans(events)
    counts = dict.fromkeys(PHASES, 0)
    for e in events:
        phase = _phase_of(spans, e.time_range.start) if e.name in LAUNCH_EVENTS else None
        if phase is not None:
            counts[phase] += 1
    return counts


def quantiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def optimizer_alone(name: str, fn, device, steps: int, launches_run: bool, backend: str, prepare=None) -> dict:
    """Host ms of ``fn()`` alone on ``backend`` (``prepare()`` untimed before each call)."""
    samples = []
    with nfk.use_backend(backend), _library.observe_launches(lambda kernel: None, run=launches_run):
        for i in range(steps + 2):
            if prepare is not None:
                prepare()
            drain(device)
            start = time.perf_counter()
            fn()
            if i >= 2:
                samples.append((time.perf_counter() - start) * 1e3)
    drain(device)
    return {"provider": name, "phase": "alone", **quantiles(samples)}


def by_op_table(counts_by_provider: dict[str, collections.Counter], top: int = 12) -> str:
    """Markdown: the ops with the most device ops per step, per provider and phase."""
    lines = ["## Device ops by op (one step)", ""]
    for provider, counts in counts_by_provider.items():
        lines += [f"### {provider}", "", "| phase | op | count |", "|---|---|---:|"]
        for phase in PHASES:
            ops = sorted(((op, n) for (ph, op), n in counts.items() if ph == phase), key=lambda t: -t[1])
            for op, n in ops[:top]:
                lines.append(f"| {phase} | `{op}` | {n} |")
            rest = sum(n for _, n in ops[top:])
            if rest:
                lines.append(f"| {phase} | {len(ops) - top} other ops | {rest} |")
        lines.append("")
    return "\n".join(lines)


def _rerun_interpreted(argv) -> list[dict]:
    """On a CPU the Triton backend needs TRITON_INTERPRET=1 before triton is imported: run this
    benchmark again in a process that sets it, writing where this one would, and return its rows."""
    from bench import common

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("NFK_POISON", None)  # the tests' NaN-filled outputs would add a fill to every allocation
    subprocess.run([sys.executable, "-m", "bench.step_profile", *(argv or []), "--results-dir", str(common.RESULTS_DIR)],
                   env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
    stem = common.RESULTS_DIR / f"{NAME}_{device_slug(bench_device())}"
    common.WRITTEN.extend(p for p in (stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png"))
                          if p.exists())
    return json.loads(stem.with_suffix(".json").read_text())["rows"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="f0", choices=["tiny"] + [f"f{i}" for i in range(8)])
    parser.add_argument("--batch", type=int, default=None, help="default 32 (GPU), 2 (CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 192 (GPU), 64 (CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype; default bfloat16 (GPU), float32 = no autocast (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20 (GPU), 3 (CPU)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (default on CPU)")
    parser.add_argument("--results-dir", default=None, help=argparse.SUPPRESS)  # set by _rerun_interpreted
    args = parser.parse_args(argv)
    if args.results_dir is not None:
        from bench import common

        common.RESULTS_DIR = Path(args.results_dir)
    device = bench_device()
    on_gpu = device.type == "cuda"
    if not on_gpu and _backend.triton_available() and not _backend.triton_interpreting():
        return _rerun_interpreted(argv)
    fused_backend = "auto" if on_gpu else ("triton" if _backend.triton_available() else "torch")
    quick = args.quick or not on_gpu
    batch = args.batch or (2 if quick else 32)
    resolution = args.resolution or (64 if quick else 192)
    dtype_name = args.dtype or ("float32" if quick else "bfloat16")
    amp_dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    steps = args.steps or (3 if quick else 20)
    launches_run = on_gpu  # on a CPU the fused kernels' launches are no-ops (module docstring)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    ours0, ref0, ref_label = build_models(args.variant, 1000, device, torch.contiguous_format)
    torch_backend = not ref_label.startswith("timm")
    print(f"step_profile: NFNet-{args.variant}, batch {batch}, {resolution}px, {dtype_name}, reference = "
          f"{ref_label}; nfkernels on backend {fused_backend!r}"
          + ("" if on_gpu else " with no-op kernel launches (CPU)"), flush=True)
    providers = [
        reference_provider(ref0, x, y, amp_dtype, torch_backend),
        nfkernels_provider("nfkernels", ours0, x, y, amp_dtype, True, fused_backend),
        nfkernels_provider("nfkernels, grads kept", copy.deepcopy(ours0), x, y, amp_dtype, False, fused_backend),
    ]
    rows, counts_by_provider = [], {}
    for provider in providers:
        measure_host = on_gpu or provider.name != "reference"
        with _library.observe_launches(lambda kernel: None, run=launches_run):
            run_step(provider)  # warm-up: compiles, builds plans and momentum buffers
        counts = device_op_counts(provider, launches_run)
        counts_by_provider[provider.name] = counts
        launches = profiled_launches(provider) if on_gpu else None
        times = host_times(provider, device, steps, launches_run) if measure_host else None
        for phase in (*PHASES, "step"):
            ops = sum(n for (ph, _), n in counts.items() if phase in ("step", ph))
            row = {"provider": provider.name, "phase": phase, "device_ops": ops,
                   "launches": (sum(launches.values()) if phase == "step" else launches[phase]) if launches else None}
            row.update(quantiles(times[phase]) if times else {"ms": None, "ms_p20": None, "ms_p80": None})
            rows.append(row)
        step = rows[-1]
        print(f"  {provider.name:24s} {step['device_ops']:6d} device ops"
              + (f", {step['launches']} launches" if step["launches"] is not None else "")
              + (f", {sig(step['ms'])} ms host per step" if step["ms"] is not None else ""), flush=True)

    # Each optimizer alone, on the gradients of one backward, kept in place.
    ours = providers[2]
    with _library.observe_launches(lambda kernel: None, run=launches_run):
        ours.backward(ours.forward())
    params = nfk.agc_parameters(ours.model)
    alone = dict(device=device, steps=10 * steps, launches_run=launches_run, backend=fused_backend)
    rows.append(optimizer_alone("nfkernels SGD_AGC.step()", ours.opt.step, **alone))
    rows.append(optimizer_alone("nfkernels agc_", lambda: nfk.agc_(params), **alone))
    grads = [p.grad for p in params]
    rows.append(optimizer_alone("nfkernels agc_, new grads", lambda: nfk.agc_(params), **alone,
                                prepare=lambda: [setattr(p, "grad", g.clone()) for p, g in zip(params, grads)]))
    if on_gpu:
        from bench.train_step import reference_clip

        ref = providers[0]
        ref.backward(ref.forward())
        clip, ref_params = reference_clip(ref.model)
        ref_opt = reference_sgd(ref.model)
        rows.append(optimizer_alone("reference clip", lambda: clip(ref_params, clip_factor=0.01, eps=1e-3), **alone))
        rows.append(optimizer_alone("reference SGD.step()", ref_opt.step, **alone))
    for row in rows[-3 if not on_gpu else -5:]:
        row.update({"device_ops": None, "launches": None})
        print(f"  {row['provider']:28s} {sig(row['ms'])} ms host per call", flush=True)

    meta = {**environment(device), "variant": args.variant, "batch": batch, "resolution": resolution,
            "dtype": dtype_name, "reference": ref_label, "steps": steps, "fused_backend": fused_backend,
            "kernel_launches": "real" if launches_run else "no-ops (CPU: host cost only)"}
    notes = {
        "reference": f"{ref_label} + timm's adaptive_clip_grad + torch.optim.SGD (nesterov), zero_grad(set_to_none=True)"
                     + ("" if on_gpu else "; its ops compute on the CPU, so its host time is not measured here"),
        "nfkernels": "the fused model + SGD_AGC, zero_grad(set_to_none=True) (torch's default: new gradients every step)",
        "nfkernels, grads kept": "the same with zero_grad(set_to_none=False)",
        "nfkernels SGD_AGC.step()": "SGD_AGC.step() alone on F0's parameters, gradients kept in place",
        "nfkernels agc_": "nfkernels.agc_(agc_parameters(model)) alone, gradients kept in place",
        "nfkernels agc_, new grads": "the same with every gradient a new tensor before each call (set_to_none)",
        "reference clip": "timm's adaptive_clip_grad alone", "reference SGD.step()": "torch.optim.SGD.step() alone",
    }
    path = write_results(NAME, rows, COLUMNS, meta, device, notes=notes, case_key="phase", reference="reference",
                         unit="host time per phase", appendix=by_op_table(counts_by_provider))
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
