"""Every @triton.jit kernel of nfkernels/ops compiled for real GPU targets (sm_80, sm_90), no GPU needed.

The other tests run the kernels in Triton's CPU interpreter, which never specializes arguments
the way a compiled launch does: an int argument equal to 1 becomes a constexpr (so ``N.to(...)``
on it fails to compile), ints divisible by 16 and 16-byte-aligned pointers get the
``tt.divisibility`` attribute, and ptxas checks the generated code. This test finds those
compile-only errors in CI:

1. Discovery: every Triton jit function defined in an ``nfkernels.ops`` module that no other jit
   function calls is a kernel (helpers such as ``_act_fwd`` are compiled as part of them).
2. Recording: the real launchers run on real tensors through the public API (backend
   "triton", forward and backward, optimizer steps) with every kernel global replaced by a
   recorder, so each ``kernel[grid](*args, **meta)`` (direct or through
   ``nfkernels.ops._library.launch``) records its arguments instead of running. The arguments
   are specialized by the JIT's own binder (``triton.runtime.jit.create_function_from_signature``
   with the CUDA backend), exactly as a launch would, and identical specializations are kept once.
3. Compiling: a subprocess per target, without TRITON_INTERPRET (the interpreter replaces
   triton.language's own jit functions, e.g. ``tl.sum``, so the compiler cannot run in this
   process), calls ``kernel.run(..., warmup=True)`` on stand-ins with each recorded dtype and
   address under a stand-in driver reporting ``GPUTarget("cuda", arch, 32)``: the JIT's own
   path (binder, options, ``triton.compile`` through ptxas to a cubin) without launching.

Failures are reported per (kernel, target) with each failing specialization and the scenarios
that produced it. A new kernel no scenario launches fails its test: add a scenario below.
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
import tempfile
import time
from pathlib import Path

import pytest
import torch

import nfkernels
import nfkernels.ops
from nfkernels import _backend

triton = pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"sm80": 80, "sm90": 90}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
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


KERNELS = discover_kernels()


# ----------------------------------------------------------------------------- recording


class Recording:
    """The launches recorded so far, deduplicated per (kernel, target) by JIT specialization."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backends = {t: make_backend(GPUTarget("cuda", arch, 32)) for t, arch in TARGETS.items()}
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

    def record(self, kernel: str, jit, grid, args, kwargs) -> None:
        self.launches[kernel] = self.launches.get(kernel, 0) + 1
        for target in TARGETS:
            bound, specialization, options = self.binder(kernel, target, jit)(*args, **kwargs)
            key = repr((specialization, sorted(options.items())))
            jobs = self.jobs.setdefault((kernel, target), {})
            if key in jobs:
                if len(jobs[key]["scenarios"]) < 3 and self.scenario not in jobs[key]["scenarios"]:
                    jobs[key]["scenarios"].append(self.scenario)
                continue
            jobs[key] = {
                "id": f"{kernel}#{len(jobs)}",
                "module": KERNELS[kernel][0],
                "kernel": KERNELS[kernel][1],
                "params": {name: _encode(name, value) for name, value in bound.items()},
                "options": {k: _encode(k, v) for k, v in options.items()},
                "description": _describe(self.params[kernel], specialization, options),
                "scenarios": [self.scenario],
            }


def _encode(name: str, value):
    """A JSON stand-in for a launch argument: tensors become (dtype, address) records, which is
    all the JIT's specialization reads from them."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "data_ptr": value.data_ptr()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"launch argument {name}={value!r} ({type(value).__name__}) has no JSON encoding here; "
                    "extend _encode (and decode in _COMPILER) in tests/test_kernels_compile.py")


def _describe(params, specialization, options) -> str:
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


class _Recorder:
    """Stands in for a jit kernel global: ``kernel[grid](*args, **meta)`` records the launch."""

    def __init__(self, recording: Recording, name: str, kernel):
        from triton.runtime.jit import JITFunction

        self.recording = recording
        self.name = name
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
            self.recording.record(self.name, self.jit, grid, args, kwargs)

        return record


@contextlib.contextmanager
def _recorders_installed(recording: Recording):
    """Replace every kernel, in every nfkernels module that holds it, by a recorder."""
    originals = {name: getattr(importlib.import_module(mod), attr) for name, (mod, attr) in KERNELS.items()}
    by_id = {id(k): name for name, k in originals.items()}
    with pytest.MonkeyPatch.context() as mp:
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name == "nfkernels" or mod_name.startswith("nfkernels.")):
                continue
            for attr, value in list(vars(module).items()):
                if id(value) in by_id:
                    name = by_id[id(value)]
                    mp.setattr(module, attr, _Recorder(recording, name, originals[name]))
        yield


# ----------------------------------------------------------------------------- scenarios
#
# Each scenario calls the public API on fresh tensors; nothing is computed (the outputs keep
# their NaN poison), only the launches are recorded. Sizes follow the launchers' real block
# constants, so the specializations are the ones real inputs of those shapes produce.


def _randn(shape, dtype, device, channels_last=False, requires_grad=False):
    t = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def weight_standardize_scenarios(device):
    # (shape, channels_last): N = fan-in 27, 36 (channels_last), 1 (twice: conv and linear),
    # 64 (divisible by 16), 4096 (one full tile), 4100 (longer than MAX_BLOCK: streamed).
    shapes = [((8, 3, 3, 3), False), ((8, 4, 3, 3), True), ((4, 1, 1, 1), False), ((3, 1), False),
              ((16, 64), False), ((2, 4096), False), ((2, 4100), False)]
    for dtype in FLOAT_DTYPES:
        # fp32: every (gain, eps mode) pair; bf16, fp64: two complementary pairs; fp16: one.
        combos = {torch.float32: [(g, m) for g in (False, True) for m in ("timm", "deepmind")],
                  torch.float16: [(True, "deepmind")]}.get(dtype, [(True, "timm"), (False, "deepmind")])
        for shape, cl in shapes:
            for with_gain, mode in combos:
                label = (f"weight_standardize {_dtype_name(dtype)} {shape}{' channels_last' if cl else ''} "
                         f"{'gain' if with_gain else 'no gain'} {mode}")
                yield label, _ws_case(device, shape, dtype, cl, with_gain, mode, None)
    # Autocast-style: fp32 weight (and gain) written out in a low-precision dtype.
    for out_dtype in (torch.bfloat16, torch.float16):
        yield (f"weight_standardize float32 -> {_dtype_name(out_dtype)} gain timm",
               _ws_case(device, (8, 3, 3, 3), torch.float32, False, True, "timm", out_dtype))


def weight_standardize_batched_scenarios(device):
    """The batched kernels (one launch for many weights: mixed fan-ins, gains, eps modes; a row
    longer than MAX_BLOCK streamed), per dtype and for fp32 weights written in bf16/fp16."""
    from nfkernels.ops.weight_standardize import weight_standardize_batched

    shapes = [(8, 3, 3, 3), (4, 1, 1, 1), (16, 64), (2, 4100)]

    def case(dtype, out_dtype):
        def run():
            weights = [_randn(shape, dtype, device, requires_grad=True) for shape in shapes]
            gains = [_randn((s[0],) + (1,) * (len(s) - 1), dtype, device, requires_grad=True) if i % 2 else None
                     for i, s in enumerate(shapes)]
            outs = weight_standardize_batched(weights, gains, [1.7] * 4, [1e-5, 1e-4, 1e-5, 1e-4],
                                              [False, True, False, True], out_dtype)
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])

        return run

    for dtype in FLOAT_DTYPES:
        yield f"weight_standardize_batched {_dtype_name(dtype)}", case(dtype, None)
    for out_dtype in (torch.bfloat16, torch.float16):
        yield f"weight_standardize_batched float32 -> {_dtype_name(out_dtype)}", case(torch.float32, out_dtype)


def _ws_case(device, shape, dtype, channels_last, with_gain, mode, out_dtype):
    def run():
        w = _randn(shape, dtype, device, channels_last, requires_grad=True)
        gain = _randn((shape[0],) + (1,) * (len(shape) - 1), dtype, device, requires_grad=True) if with_gain else None
        out = nfkernels.weight_standardize(w, gain, gamma=1.7, eps=1e-4 if mode == "deepmind" else 1e-5,
                                           eps_mode=mode, out_dtype=out_dtype)
        out.backward(torch.randn_like(out))

    return run


def scaled_act_scenarios(device):
    from nfkernels.ops.scaled_act import ACTIVATIONS

    # Every activation in fp32 and in fp64 (its own math dtype), forward and backward with dbias.
    for act in ACTIVATIONS:
        for dtype in (torch.float32, torch.float64):
            yield _sa_label(act, dtype, (2, 4, 5, 5), False, True, True), _sa_case(
                device, act, dtype, (2, 4, 5, 5), False, True, True)
    # Every dtype in the other layouts (shape, channels_last, bias, bias needs grad).
    layouts = [
        ((2, 4, 5, 5), True, True, True),  # channels_last: channel on columns
        ((2, 6), False, False, False),  # (N, C), no bias
        ((2, 3, 7), False, True, False),  # (N, C, L), bias without its gradient
    ]
    for dtype in FLOAT_DTYPES:
        for shape, cl, bias, grad in layouts:
            yield _sa_label("gelu", dtype, shape, cl, bias, grad), _sa_case(device, "gelu", dtype, shape, cl, bias, grad)
    for dtype in (torch.bfloat16, torch.float16):
        # The two activations that build constants in z's dtype, and low-precision x next to an
        # fp32 bias (autocast).
        for act in ("leaky_relu", "identity"):
            yield _sa_label(act, dtype, (2, 4, 5, 5), False, True, True), _sa_case(
                device, act, dtype, (2, 4, 5, 5), False, True, True)
        yield (_sa_label("gelu", dtype, (2, 4, 5, 5), False, True, True) + " fp32 bias",
               _sa_case(device, "gelu", dtype, (2, 4, 5, 5), False, True, True, bias_dtype=torch.float32))
    edges = [
        ((1, 4, 1, 1), False, True, True),  # N = 1, H = W = 1: one row (R = 1)
        ((1, 4, 1, 1), True, True, True),
        ((3, 1, 2, 2), False, True, True),  # C = 1 with channel on rows
        ((3, 1, 2, 2), True, True, True),  # C = 1 = K with channel on columns
        ((1, 1, 1, 1), False, True, True),  # a single element
        ((2, 1), False, True, True),
        ((1, 2, 40, 40), False, True, True),  # rows longer than MAX_BLOCK_K: several column tiles
        ((2, 16, 8, 8), False, True, True),  # sizes divisible by 16
        ((2, 16, 8, 8), True, True, True),
        ((1, 1024, 65, 65), True, True, True),  # > MAX_ROW_GROUPS row blocks: row_tiles = 2
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for i, (shape, cl, bias, grad) in enumerate(edges):
            if dtype != torch.float32 and i >= 4:
                continue  # other dtypes: the size-1 cases
            act = "silu" if dtype != torch.float64 else "gelu"
            yield _sa_label(act, dtype, shape, cl, bias, grad), _sa_case(device, act, dtype, shape, cl, bias, grad)


def _sa_label(act, dtype, shape, cl, bias, grad):
    extra = "" if not bias else (" bias" if grad else " bias(no grad)")
    return f"scaled_act {act} {_dtype_name(dtype)} {shape}{' channels_last' if cl else ''}{extra}"


def _sa_case(device, act, dtype, shape, channels_last, with_bias, bias_grad, bias_dtype=None):
    def run():
        x = _randn(shape, dtype, device, channels_last, requires_grad=True)
        bias = _randn((shape[1],), bias_dtype or dtype, device, requires_grad=bias_grad) if with_bias else None
        y = nfkernels.scaled_act(x, bias, act=act, scale=0.9)
        y.backward(torch.randn_like(y))

    return run


def se_gate_scenarios(device):
    for dtype in FLOAT_DTYPES:
        for cl in (False, True):
            for full in (True, False):
                yield _se_label(dtype, (2, 8, 5, 5), cl, full), _se_case(device, dtype, (2, 8, 5, 5), cl, full)
    edges = [
        ((2, 8, 1, 1), False), ((2, 8, 1, 1), True),  # H = W = 1
        ((1, 8, 5, 5), False), ((1, 8, 5, 5), True),  # N = 1
        ((2, 1, 5, 5), False), ((2, 1, 5, 5), True),  # C = 1
        ((1, 4, 48, 48), False), ((1, 4, 48, 48), True),  # HW > REDUCE_TILE: the reductions loop
        ((1, 1, 1, 1), False),
        ((2, 8, 5, 1), False),  # W = 1: the hw stride is H's
        ((2, 16, 4, 4), False), ((2, 16, 4, 4), True),  # sizes divisible by 16
        ((1, 160, 4, 4), True),  # C > MAX_BLOCK_C in channels_last
    ]
    for shape, cl in edges:  # fp32: with and without SE
        for full in (True, False):
            yield _se_label(torch.float32, shape, cl, full), _se_case(device, torch.float32, shape, cl, full)
    for shape, cl in edges[:8]:  # fp64 (its own accumulation dtype): the size-1 and looping cases
        yield _se_label(torch.float64, shape, cl, True), _se_case(device, torch.float64, shape, cl, True)
    # Autocast: low-precision activations with fp32 parameters.
    yield (_se_label(torch.bfloat16, (2, 8, 5, 5), False, True) + " fp32 params",
           _se_case(device, torch.bfloat16, (2, 8, 5, 5), False, True, param_dtype=torch.float32))


def _se_label(dtype, shape, cl, full):
    what = "SE+shortcut+biases+skip+mask" if full else "no SE, no shortcut"
    return f"se_gate_residual {_dtype_name(dtype)} {shape}{' channels_last' if cl else ''} {what}"


def _se_case(device, dtype, shape, channels_last, full, param_dtype=None):
    def run():
        n, c = shape[:2]
        pd = param_dtype or dtype
        h = _randn(shape, dtype, device, channels_last, requires_grad=True)
        if not full:
            out = nfkernels.se_gate_residual(h, None, alpha=0.2)
        else:
            rd = max(1, c // 2)
            shortcut = _randn(shape, dtype, device, channels_last, requires_grad=True)
            p = dict(
                fc1_weight=_randn((rd, c, 1, 1), pd, device, requires_grad=True),
                fc1_bias=_randn((rd,), pd, device, requires_grad=True),
                fc2_weight=_randn((c, rd, 1, 1), pd, device, requires_grad=True),
                fc2_bias=_randn((c,), pd, device, requires_grad=True),
            )
            out = nfkernels.se_gate_residual(
                h, shortcut, **p,
                bias=_randn((c,), pd, device, requires_grad=True),
                shortcut_bias=_randn((c,), pd, device, requires_grad=True),
                skip_gain=_randn((), pd, device, requires_grad=True),
                mask=torch.ones(n, dtype=dtype, device=device),
                alpha=0.2, attn_gain=2.0,
            )
        out.backward(torch.randn_like(out))

    return run


def _param(shape, dtype, device, offset=0, grad_dtype=None):
    """A leaf tensor with a gradient (of ``grad_dtype``, default ``dtype``); ``offset`` > 0 places
    both at an element offset into a larger buffer (pointers not 16-byte aligned)."""
    numel = 1
    for s in shape:
        numel *= s
    grad_dtype = grad_dtype or dtype
    p = _randn((numel + offset,), dtype, device)[offset:].view(shape)
    p.grad_dtype = grad_dtype
    p.grad = _randn((numel + offset,), grad_dtype, device)[offset:].view(shape) * 0.1
    return p


# Parameter sets: a conv weight, a linear weight, a bias and a 0-d gain; rows longer than the
# AGC kernels' MAX_BLOCK; a single one-element unit; parameters at unaligned addresses.
_PARAM_SETS = {
    "conv+linear+bias+scalar": [((8, 3, 3, 3), 0), ((16, 64), 0), ((8,), 0), ((), 0)],
    "long rows": [((2, 5000), 0), ((3, 17), 0)],
    "one element": [((1,), 0)],
    "unaligned": [((5, 7), 1), ((3,), 1)],
}


# Gradients whose dtype differs from their parameter's (torch's grad_dtype): mixed precision.
_MIXED_DTYPES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)]


def agc_scenarios(device):
    for dtype in FLOAT_DTYPES:
        for set_name, specs in _PARAM_SETS.items():
            if dtype != torch.float32 and set_name not in ("conv+linear+bias+scalar", "unaligned"):
                continue
            yield f"agc_ {_dtype_name(dtype)} {set_name}", _agc_case(device, dtype, specs)
    for dtype, grad_dtype in _MIXED_DTYPES:
        yield (f"agc_ {_dtype_name(dtype)} with {_dtype_name(grad_dtype)} grads",
               _agc_case(device, dtype, _PARAM_SETS["conv+linear+bias+scalar"], grad_dtype))


def _agc_case(device, dtype, specs, grad_dtype=None):
    def run():
        params = [_param(shape, dtype, device, offset, grad_dtype) for shape, offset in specs]
        nfkernels.agc_(params, clip_factor=0.01, eps=1e-3)

    return run


def sgd_agc_scenarios(device):
    # (momentum, nesterov) x weight decay x clipping, two steps each (the first fills the buffer).
    configs = [(m, n, wd, clip) for m, n in ((0.0, False), (0.9, False), (0.9, True))
               for wd in (0.0, 1e-4) for clip in (True, False)]
    for m, n, wd, clip in configs:
        yield _sgd_label(torch.float32, "conv+linear+bias+scalar", m, n, wd, clip), _sgd_case(
            device, torch.float32, _PARAM_SETS["conv+linear+bias+scalar"], m, n, wd, clip)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for m, n, wd, clip in [(0.9, True, 1e-4, True), (0.0, False, 0.0, False)]:
            yield _sgd_label(dtype, "conv+linear+bias+scalar", m, n, wd, clip), _sgd_case(
                device, dtype, _PARAM_SETS["conv+linear+bias+scalar"], m, n, wd, clip)
    for set_name in ("long rows", "one element", "unaligned"):
        for dtype in (torch.float32, torch.float64) if set_name == "unaligned" else (torch.float32,):
            yield _sgd_label(dtype, set_name, 0.9, True, 1e-4, True), _sgd_case(
                device, dtype, _PARAM_SETS[set_name], 0.9, True, 1e-4, True)
    for dtype, grad_dtype in _MIXED_DTYPES:
        yield (_sgd_label(dtype, "conv+linear+bias+scalar", 0.9, True, 1e-4, True) + f" {_dtype_name(grad_dtype)} grads",
               _sgd_case(device, dtype, _PARAM_SETS["conv+linear+bias+scalar"], 0.9, True, 1e-4, True, grad_dtype))


def _sgd_label(dtype, set_name, momentum, nesterov, wd, clip):
    return (f"SGD_AGC {_dtype_name(dtype)} {set_name} momentum={momentum} nesterov={nesterov} "
            f"weight_decay={wd} clipping={clip}")


def _sgd_case(device, dtype, specs, momentum, nesterov, wd, clip, grad_dtype=None):
    def run():
        from nfkernels.optim import SGD_AGC

        params = [_param(shape, dtype, device, offset, grad_dtype) for shape, offset in specs]
        opt = SGD_AGC(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd, clipping=clip)
        opt.step()
        opt.step()

    return run


SCENARIOS = (weight_standardize_scenarios, weight_standardize_batched_scenarios, scaled_act_scenarios, se_gate_scenarios, agc_scenarios,
             sgd_agc_scenarios)


def record_all(device) -> Recording:
    recording = Recording()
    with _recorders_installed(recording), nfkernels.use_backend("triton"):
        for make in SCENARIOS:
            for label, run in make(device):
                recording.scenario = label
                try:
                    run()
                except Exception as err:  # noqa: BLE001 (reported by test_scenarios_run)
                    recording.scenario_errors.append(f"{label}: {type(err).__name__}: {err}")
    return recording


# ----------------------------------------------------------------------------- compiling

# Runs in a fresh interpreter without TRITON_INTERPRET, so that the kernels (and triton.language's
# own jit functions) are real JITFunctions: argv = jobs.json, arch, results.jsonl.
_COMPILER = r"""
import importlib, json, sys, time, traceback
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

jobs_path, arch, results_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
target = GPUTarget("cuda", arch, 32)


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
            kernel.run(grid=(1,), warmup=True, **params, **job["options"])
            result = {"ok": True}
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


def compile_all(jobs_by_target: dict[str, list[dict]], workdir: Path) -> dict[str, dict[str, dict]]:
    """Compile every target's jobs in its own subprocess, the targets in parallel. A compiler crash
    (no Python exception) fails the job it was on and the rest go to a fresh subprocess; a
    subprocess that dies before compiling anything is an error."""
    results: dict[str, dict[str, dict]] = {t: {} for t in jobs_by_target}
    pending = {t: list(jobs) for t, jobs in jobs_by_target.items() if jobs}
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    attempt = 0
    while pending:
        attempt += 1
        procs = {}
        for target, jobs in pending.items():
            jobs_path = workdir / f"jobs-{target}-{attempt}.json"
            jobs_path.write_text(json.dumps(jobs))
            results_path = workdir / f"results-{target}-{attempt}.jsonl"
            log_path = workdir / f"log-{target}-{attempt}.txt"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _COMPILER, str(jobs_path), str(TARGETS[target]), str(results_path)],
                    cwd=REPO_ROOT, env=_compiler_env(), stdout=log, stderr=subprocess.STDOUT,
                )
            procs[target] = (proc, results_path, log_path)
        next_pending = {}
        for target, (proc, results_path, log_path) in procs.items():
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
            rest = [job for job in pending[target] if job["id"] not in results[target]]
            if time.monotonic() < deadline:
                next_pending[target] = rest
            else:
                for job in rest:
                    results[target][job["id"]] = {"ok": False, "error": f"not compiled: {COMPILE_TIMEOUT_S} s timeout"}
        pending = {t: jobs for t, jobs in next_pending.items() if jobs}
    return results


# ----------------------------------------------------------------------------- fixtures and tests


def _ptxas_missing() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception as err:  # noqa: BLE001
        return f"Triton's ptxas is not available ({type(err).__name__}: {err})"
    if not path or not os.path.exists(path):
        return f"Triton's bundled ptxas is missing ({path!r})"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(recording, {target: {job id: result}}, seconds): recorded once, compiled once per module."""
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    if _backend.triton_interpreting():
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        pytest.skip("the launchers run on CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    start = time.perf_counter()
    recording = record_all(device)
    recorded = time.perf_counter()
    jobs_by_target = {t: [job for (k, tt), jobs in sorted(recording.jobs.items()) if tt == t for job in jobs.values()]
                      for t in TARGETS}
    results = compile_all(jobs_by_target, tmp_path_factory.mktemp("kernels_compile"))
    done = time.perf_counter()
    print(f"\nkernels_compile: recorded {sum(recording.launches.values())} launches in {recorded - start:.1f} s; "
          f"compiled {', '.join(f'{len(j)} {t}' for t, j in jobs_by_target.items())} specializations "
          f"in {done - recorded:.1f} s")
    return recording, results


def test_kernels_discovered():
    assert KERNELS, "no @triton.jit kernels found in nfkernels.ops"


def test_scenarios_run(compiled):
    recording, _ = compiled
    assert not recording.scenario_errors, "scenarios failed on the host side:\n" + "\n".join(recording.scenario_errors)


def test_specializations_cover_edge_cases(compiled):
    """The scenarios reach the specializations this test exists for (guards against the recording
    silently degrading): an int argument specialized to the constant 1, an int with the
    divisibility attribute, pointers both with and without it."""
    recording, _ = compiled
    descriptions = [job["description"] for (k, t), jobs in recording.jobs.items() if t == "sm90" for job in jobs.values()]
    joined = "\n".join(descriptions)
    assert "=1[specialized to constexpr]" in joined
    assert any(":i32[div16]" in d for d in descriptions)
    assert any("_ptr:*" in d and "[div16]" in d for d in descriptions)
    assert any(re.search(r"_ptr:\*\w+(,|$)", d) for d in descriptions), "no pointer without [div16]"


def _shorten(error: str, keep: int = 8) -> str:
    """A compiler error's first line and its last ``keep`` (a CompilationError prints the kernel
    source up to the failing line, docstring included; its end holds the line, caret and cause)."""
    lines = error.splitlines()
    if len(lines) <= keep + 2:
        return error
    return "\n".join(lines[:1] + [f"[... {len(lines) - keep - 1} lines]"] + lines[-keep:])


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_compiles(compiled, kernel, target):
    recording, results = compiled
    if not recording.launches.get(kernel):
        pytest.fail(f"{kernel} ({KERNELS[kernel][0]}) is never launched by this file's scenarios; add one that "
                    "reaches it (tests/test_kernels_compile.py, SCENARIOS)")
    jobs = list(recording.jobs[kernel, target].values())
    failures = []
    for job in jobs:
        result = results[target].get(job["id"], {"ok": False, "error": "no result"})
        if not result["ok"]:
            error = _shorten(result["error"])
            failures.append(f"- {kernel} [{target}] {job['description']}\n  from: {'; '.join(job['scenarios'])}\n"
                            f"  {error.replace(chr(10), chr(10) + '  ')}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(jobs)} specializations of {kernel} fail to compile for {target}:\n"
                    + "\n".join(failures), pytrace=False)
