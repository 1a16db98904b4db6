"""Every @triton.jit kernel of nfkernels/ops, recorded from real launches and compiled for real GPU
targets without a GPU: the machinery behind tests/test_kernels_compile.py (does every
specialization compile, does any spill) and ``python -m bench.kernel_report`` (registers, spills,
load/store widths of the kernels an NFNet training step uses).

1. Discovery (``discover_kernels``): every Triton jit function defined in an ``nfkernels.ops``
   module that no other jit function calls is a kernel (helpers such as ``_act_fwd`` are compiled
   as part of them).
2. Recording (``Recording``, ``recorders_installed``): the real launchers run on real tensors
   through the public API with every kernel global replaced by a recorder, so each
   ``kernel[grid](*args, **meta)`` (direct or through ``nfkernels.ops._library.launch``) records
   its arguments instead of running. The arguments are specialized by the JIT's own binder
   (``triton.runtime.jit.create_function_from_signature`` with the CUDA backend), exactly as a
   launch would, and identical specializations are kept once.
3. Compiling (``compile_all``): a subprocess per target (or several), without TRITON_INTERPRET
   (the interpreter replaces triton.language's own jit functions, e.g. ``tl.sum``, so the compiler
   cannot run in a process that has it), calls ``kernel.run(..., warmup=True)`` on stand-ins with
   each recorded dtype and address under a stand-in driver reporting ``GPUTarget("cuda", arch,
   32)``: the JIT's own path (binder, options, ``triton.compile`` through ptxas to a cubin) without
   launching. With ``metrics=True`` it also runs Triton's ptxas with ``-v`` on the PTX (registers,
   spill bytes, stack frame; kept next to the kernel in Triton's cache, keyed by the kernel's
   hash) and counts the global loads and stores of the PTX by width.

Nothing here needs pytest: the test module imports it, and so does the benchmark.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"sm80": 80, "sm90": 90}
COMPILE_TIMEOUT_S = 900


# ----------------------------------------------------------------------------- discovery


def _jit_types() -> tuple[type, ...]:
    from triton.runtime.jit import JITFunction

    types: tuple[type, ...] = (JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types += (InterpretedFunction,)
    except ImportError:  # pragma: no cover
        pass
    return types


def _ops_modules():
    import nfkernels.ops

    for info in sorted(pkgutil.iter_modules(nfkernels.ops.__path__), key=lambda i: i.name):
        yield importlib.import_module(f"{nfkernels.ops.__name__}.{info.name}")


def discover_kernels() -> dict[str, tuple[str, str]]:
    """{kernel name: (module, attribute)} for every launchable jit function of nfkernels.ops."""
    jit_types = _jit_types()
    jits = {}
    for module in _ops_modules():
        for name, value in vars(module).items():
            if isinstance(value, jit_types) and getattr(value.fn, "__module__", None) == module.__name__:
                jits[(module.__name__, name)] = value
    called = set()
    for value in jits.values():
        called.update(value.fn.__code__.co_names)
    kernels = {}
    for (module, name), value in sorted(jits.items()):
        if name in called:
            continue  # a device function, compiled inside the kernels that call it
        assert name not in kernels, f"two kernels named {name}: {kernels[name]} and {(module, name)}"
        kernels[name] = (module, name)
    return kernels


# ----------------------------------------------------------------------------- recording


class Recording:
    """The launches recorded so far, deduplicated per (kernel, target) by JIT specialization."""

    def __init__(self, kernels: dict[str, tuple[str, str]] | None = None, targets: dict[str, int] | None = None):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.kernels = kernels if kernels is not None else discover_kernels()
        self.targets = dict(targets or TARGETS)
        self.backends = {t: make_backend(GPUTarget("cuda", arch, 32)) for t, arch in self.targets.items()}
        self.binders: dict[tuple[str, str], object] = {}
        self.params: dict[str, list] = {}
        self.scenario = "?"
        self.launches: dict[str, int] = {}
        # (kernel, target) -> {spec key: job}
        self.jobs: dict[tuple[str, str], dict[str, dict]] = {}
        self.scenario_errors: list[str] = []

    def binder(self, kernel: str, target: str, jit):
        """The JIT's own argument binder/specializer for ``jit`` on ``target``'s backend."""
        from triton.runtime.jit import create_function_from_signature

        if (kernel, target) not in self.binders:
            self.params[kernel] = jit.params
            self.binders[kernel, target] = create_function_from_signature(jit.signature, jit.params,
                                                                          self.backends[target])
        return self.binders[kernel, target]

    def launch(self, recorder: "Recorder", grid, args, kwargs) -> None:
        """What a recorder's ``kernel[grid](*args, **kwargs)`` does: record it (subclasses add to this)."""
        self.record(recorder.name, recorder.jit, grid, args, kwargs)

    def record(self, kernel: str, jit, grid, args, kwargs) -> dict[str, str]:
        """Record one launch; returns {target: id of its specialization's job}."""
        self.launches[kernel] = self.launches.get(kernel, 0) + 1
        ids = {}
        for target in self.targets:
            bound, specialization, options = self.binder(kernel, target, jit)(*args, **kwargs)
            key = repr((specialization, sorted(options.items())))
            jobs = self.jobs.setdefault((kernel, target), {})
            if key in jobs:
                if len(jobs[key]["scenarios"]) < 3 and self.scenario not in jobs[key]["scenarios"]:
                    jobs[key]["scenarios"].append(self.scenario)
                ids[target] = jobs[key]["id"]
                continue
            jobs[key] = {
                "id": f"{kernel}#{len(jobs)}",
                "key": key,
                "module": self.kernels[kernel][0],
                "kernel": self.kernels[kernel][1],
                "params": {name: encode(name, value) for name, value in bound.items()},
                "options": {k: encode(k, v) for k, v in options.items()},
                "description": describe(self.params[kernel], specialization, options),
                "scenarios": [self.scenario],
            }
            ids[target] = jobs[key]["id"]
        return ids

    def jobs_by_target(self) -> dict[str, list[dict]]:
        return {t: [job for (k, tt), jobs in sorted(self.jobs.items()) if tt == t for job in jobs.values()]
                for t in self.targets}


def encode(name: str, value):
    """A JSON stand-in for a launch argument: tensors become (dtype, address) records, which is
    all the JIT's specialization reads from them."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "data_ptr": value.data_ptr()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"launch argument {name}={value!r} ({type(value).__name__}) has no JSON encoding here; "
                    "extend encode (and decode in _COMPILER) in bench/kernel_compile.py")


def describe(params, specialization, options) -> str:
    parts = []
    for param, (ty, attr) in zip(params, specialization):
        if param.is_constexpr:
            parts.append(f"{param.name}={_short(ty, attr)}")
        elif ty == "constexpr":  # a runtime argument the JIT turned into a constant (int 1, None)
            parts.append(f"{param.name}={attr!r}[specialized to constexpr]")
        else:
            parts.append(f"{param.name}:{ty}{'[div16]' if attr == 'D' else ''}")
    parts += [f"{k}={v}" for k, v in sorted(options.items())]
    return ", ".join(parts)


def _short(ty, attr):
    return repr(attr) if ty == "constexpr" else f"{ty}:{attr}"


class Recorder:
    """Stands in for a jit kernel global: ``kernel[grid](*args, **meta)`` hands the launch to the
    recording. ``kernel`` is the original (an InterpretedFunction under TRITON_INTERPRET=1)."""

    def __init__(self, recording: Recording, name: str, kernel):
        from triton.runtime.jit import JITFunction

        self.recording = recording
        self.name = name
        self.kernel = kernel
        if isinstance(kernel, JITFunction):
            self.jit = kernel
        else:
            # Under TRITON_INTERPRET=1 the kernel is an InterpretedFunction; a JITFunction of its
            # Python function (with the decorator's specialization options) only parses the
            # parameters (annotations, constexpr flags): nothing is compiled in this process.
            options = {k: v for k, v in kernel.kwargs.items()
                       if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
            self.jit = JITFunction(kernel.fn, **options)

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.recording.launch(self, grid, args, kwargs)

        return record


@contextlib.contextmanager
def recorders_installed(recording: Recording):
    """Replace every kernel, in every nfkernels module that holds it, by a recorder."""
    originals = {name: getattr(importlib.import_module(mod), attr) for name, (mod, attr) in recording.kernels.items()}
    by_id = {id(k): name for name, k in originals.items()}
    replaced = []
    try:
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name == "nfkernels" or mod_name.startswith("nfkernels.")):
                continue
            for attr, value in list(vars(module).items()):
                if id(value) in by_id:
                    name = by_id[id(value)]
                    replaced.append((module, attr, value))
                    setattr(module, attr, Recorder(recording, name, originals[name]))
        yield
    finally:
        for module, attr, value in reversed(replaced):
            setattr(module, attr, value)


# ----------------------------------------------------------------------------- compiling

# Runs in a fresh interpreter without TRITON_INTERPRET, so that the kernels (and triton.language's
# own jit functions) are real JITFunctions: argv = jobs.json, arch, results.jsonl, metrics (0/1).
_COMPILER = r"""
import importlib, json, os, re, subprocess, sys, tempfile, time, traceback
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

jobs_path, arch, results_path, want_metrics = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
target = GPUTarget("cuda", arch, 32)
from bench.kernel_compile import compiled_metrics


class Driver:  # what JITFunction.run asks of the active driver, for a GPU that is not here
    def get_current_device(self):
        return ("nfk-compile-test", arch)

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return target


class Tensor:  # all the JIT's specialization reads from a tensor: dtype and address
    def __init__(self, dtype, data_ptr):
        self.dtype = getattr(torch, dtype)
        self._data_ptr = data_ptr

    def data_ptr(self):
        return self._data_ptr


def decode(v):
    return Tensor(v["tensor"], v["data_ptr"]) if isinstance(v, dict) else v


driver.set_active(Driver())
with open(jobs_path) as f:
    jobs = json.load(f)
with open(results_path, "a") as out:
    for job in jobs:
        out.write(json.dumps({"id": job["id"], "started": True}) + "\n")
        out.flush()
        start = time.perf_counter()
        try:
            kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
            if not isinstance(kernel, JITFunction):
                raise TypeError(f"{job['module']}.{job['kernel']} is a {type(kernel).__name__}, not a JITFunction")
            params = {k: decode(v) for k, v in job["params"].items()}
            compiled = kernel.run(grid=(1,), warmup=True, **params, **job["options"])
            result = {"ok": True}
            if want_metrics:
                try:
                    result["metrics"] = compiled_metrics(compiled)
                except Exception as err:
                    result["metrics_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
        except Exception as err:
            result = {"ok": False, "error": "".join(traceback.format_exception_only(type(err), err)).strip()}
        result.update(id=job["id"], seconds=time.perf_counter() - start)
        out.write(json.dumps(result) + "\n")
        out.flush()
"""


def _compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _chunks(jobs: list, n: int) -> list[list]:
    n = max(1, min(n, len(jobs)))
    return [jobs[i::n] for i in range(n)]


def compile_all(jobs_by_target: dict[str, list[dict]], workdir: Path, *, targets: dict[str, int] | None = None,
                metrics: bool = False, workers: int = 1,
                timeout_s: float = COMPILE_TIMEOUT_S) -> dict[str, dict[str, dict]]:
    """Compile every target's jobs in ``workers`` subprocesses per target, all in parallel. A
    compiler crash (no Python exception) fails the job it was on and the rest go to a fresh
    subprocess; a subprocess that dies before compiling anything is an error. ``metrics``: each
    result also gets ``metrics`` (``compiled_metrics``) or ``metrics_error``."""
    targets = targets or TARGETS
    results: dict[str, dict[str, dict]] = {t: {} for t in jobs_by_target}
    pending = {(t, i): chunk for t, jobs in jobs_by_target.items() if jobs
               for i, chunk in enumerate(_chunks(list(jobs), workers))}
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while pending:
        attempt += 1
        procs = {}
        for (target, worker), jobs in pending.items():
            stem = f"{target}-{worker}-{attempt}"
            jobs_path = workdir / f"jobs-{stem}.json"
            jobs_path.write_text(json.dumps(jobs))
            results_path = workdir / f"results-{stem}.jsonl"
            log_path = workdir / f"log-{stem}.txt"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _COMPILER, str(jobs_path), str(targets[target]), str(results_path),
                     "1" if metrics else "0"],
                    cwd=REPO_ROOT, env=_compiler_env(), stdout=log, stderr=subprocess.STDOUT,
                )
            procs[target, worker] = (proc, results_path, log_path)
        next_pending = {}
        for (target, worker), (proc, results_path, log_path) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            started, finished = None, 0
            if results_path.exists():
                for line in results_path.read_text().splitlines():
                    entry = json.loads(line)
                    if entry.get("started"):
                        started = entry["id"]
                    else:
                        results[target][entry["id"]] = entry
                        started, finished = None, finished + 1
            if proc.returncode == 0:
                continue
            log_tail = log_path.read_text(errors="replace")[-4000:]
            if started is None and finished == 0:
                raise RuntimeError(f"the {target} compiler subprocess failed before compiling anything "
                                   f"(exit {proc.returncode}):\n{log_tail}")
            if started is not None:
                results[target][started] = {"ok": False, "error": f"the compiler subprocess died (exit "
                                            f"{proc.returncode}) compiling this specialization:\n{log_tail}"}
            rest = [job for job in pending[target, worker] if job["id"] not in results[target]]
            if time.monotonic() < deadline:
                next_pending[target, worker] = rest
            else:
                for job in rest:
                    results[target][job["id"]] = {"ok": False, "error": f"not compiled: {timeout_s:.0f} s timeout"}
        pending = {key: jobs for key, jobs in next_pending.items() if jobs}
    return results


def ptxas_missing() -> str | None:
    """Why Triton's bundled ptxas cannot run here, or None."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception as err:  # noqa: BLE001
        return f"Triton's ptxas is not available ({type(err).__name__}: {err})"
    if not path or not os.path.exists(path):
        return f"Triton's bundled ptxas is missing ({path!r})"
    return None


def spills(metrics: dict | None) -> int:
    """Spill bytes (stores + loads) of a ``compiled_metrics`` record."""
    return (metrics or {}).get("spill_stores", 0) + (metrics or {}).get("spill_loads", 0)


def widths_text(hist: dict[str, int]) -> str:
    """{"128": 3, "32": 1} -> "128b×3 32b×1", widest first ("-" for none)."""
    items = sorted(((int(bits), n) for bits, n in hist.items()), reverse=True)
    return " ".join(f"{bits}b×{n}" for bits, n in items) or "-"




# ----------------------------------------------------------------------------- metrics

METRICS_VERSION = 1  # bump when compiled_metrics changes what it records (cached results are keyed on it)

_PTX_GLOBAL = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[\w:]+)*)")
_PTX_TYPE = re.compile(r"^[bfsu](\d+)$")
_SASS_GLOBAL = re.compile(r"\b(LDG|STG|ATOMG|REDG|RED)((?:\.[A-Z0-9_]+)*)")
_SASS_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_SASS_KIND = {"LDG": "ld", "STG": "st", "ATOMG": "atom", "REDG": "atom", "RED": "atom"}


def ptx_memory_widths(ptx: str) -> dict[str, dict[str, int]]:
    """{"ld"|"st"|"atom": {bits: count}}: the global loads, stores and atomics of a PTX listing,
    each instruction once (static counts, not executions), by bits moved per thread: the vector
    width (.v2/.v4/.v8) times the element type's bits (ld.global.v4.b32 -> 128)."""
    hist: dict[str, dict[str, int]] = {"ld": {}, "st": {}, "atom": {}}
    for op, mods in _PTX_GLOBAL.findall(ptx):
        parts = mods.split(".")[1:]
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(m.group(1)) for p in reversed(parts) if (m := _PTX_TYPE.match(p))), 0)
        kind = {"ld": "ld", "st": "st"}.get(op, "atom")
        key = str(vec * bits)
        hist[kind][key] = hist[kind].get(key, 0) + 1
    return hist


def sass_memory_widths(sass: str) -> dict[str, dict[str, int]]:
    """The same from a SASS listing (cuobjdump -sass): LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E
    -> 32 (atomics by their operand size the same way)."""
    hist: dict[str, dict[str, int]] = {"ld": {}, "st": {}, "atom": {}}
    for op, mods in _SASS_GLOBAL.findall(sass):
        parts = mods.split(".")[1:]
        bits = next((_SASS_BITS[p] for p in parts if p in _SASS_BITS), 32)
        kind = _SASS_KIND[op]
        hist[kind][str(bits)] = hist[kind].get(str(bits), 0) + 1
    return hist


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """{function: {registers, spill_stores, spill_loads, stack, smem}} from ``ptxas -v`` output
    (nvcc -Xptxas -v prints the same lines), one entry per compiled entry function."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), {"registers": None, "spill_stores": 0, "spill_loads": 0,
                                                  "stack": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            if s:
                current["smem"] = int(s.group(1))
    return out


def compiled_metrics(compiled) -> dict:
    """Registers, spill bytes, stack frame (Triton's ptxas -v on the kernel's PTX, with the flags
    Triton compiles it with), global load/store widths (the PTX) and warps of a CompiledKernel.
    Kept in Triton's cache next to the kernel (keyed by its hash), so a cached kernel costs nothing."""
    import tempfile

    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    cache = get_cache_manager(compiled.hash)
    name = f"{compiled.name}.nfk-metrics-v{METRICS_VERSION}-{arch}.json"
    path = cache.get_file(name)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    ptxas = knobs.nvidia.ptxas.path
    fmad = [] if getattr(compiled.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-lineinfo", *fmad, "-v", f"--gpu-name={arch}", src, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    functions = parse_ptxas_log(run.stdout + run.stderr)
    if len(functions) != 1:
        raise RuntimeError(f"expected one function in ptxas -v output, got {sorted(functions)}:\n{run.stderr[-2000:]}")
    metrics = {**next(iter(functions.values())), "arch": arch, "num_warps": compiled.metadata.num_warps,
               "shared": compiled.metadata.shared, "widths": ptx_memory_widths(ptx)}
    cache.put(json.dumps(metrics), name, binary=False)
    return metrics
