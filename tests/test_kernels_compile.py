"""Every @triton.jit kernel of nfkernels/ops compiled for real GPU targets (sm_80, sm_90), no GPU needed.

The other tests run the kernels in Triton's CPU interpreter, which never specializes arguments
the way a compiled launch does: an int argument equal to 1 becomes a constexpr (so ``N.to(...)``
on it fails to compile), ints divisible by 16 and 16-byte-aligned pointers get the
``tt.divisibility`` attribute, and ptxas checks the generated code. This test finds those
compile-only errors in CI, and any specialization that spills registers to local memory.

The machinery is bench/kernel_compile.py's (``python -m bench.kernel_report`` uses it too):

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
   path (binder, options, ``triton.compile`` through ptxas to a cubin) without launching; then
   Triton's ptxas -v on the PTX gives registers and spill bytes.

Failures are reported per (kernel, target) with each failing specialization and the scenarios
that produced it. A new kernel no scenario launches fails its test: add a scenario below.
"""
from __future__ import annotations

import re
import time

import pytest
import torch

import nfkernels
from nfkernels import _backend

triton = pytest.importorskip("triton")

from bench.kernel_compile import (TARGETS, Recording, compile_all, discover_kernels,  # noqa: E402
                                  ptxas_missing, recorders_installed, spills)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNELS = discover_kernels()


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
        ((1, 2, 40, 40), False, True, True),  # H·W = 1600 = 1024 + 512 + 64: three row pieces
        ((2, 16, 8, 8), False, True, True),  # sizes divisible by 16
        ((2, 16, 8, 8), True, True, True),
        ((1, 1024, 65, 65), True, True, True),  # many channel blocks, H·W odd
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for i, (shape, cl, bias, grad) in enumerate(edges):
            if dtype != torch.float32 and i >= 4:
                continue  # other dtypes: the size-1 cases
            act = "silu" if dtype != torch.float64 else "gelu"
            yield _sa_label(act, dtype, shape, cl, bias, grad), _sa_case(device, act, dtype, shape, cl, bias, grad)
    # A backward whose channel blocks are split over programs (the device would have idle SMs):
    # partial dbias rows, the counter and the last program's finish, FINISH_ROWS below the split.
    splits = [((2, 4, 6, 6), False, None), ((2, 16, 12, 12), True, None), ((2, 16, 12, 12), True, 16)]
    for dtype, bias_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32), (torch.float64, None)):
        for shape, cl, finish_elems in splits:
            label = _sa_label("gelu", dtype, shape, cl, True, True) + " split"
            label += f" finish {finish_elems}" if finish_elems else ""
            label += " fp32 bias" if bias_dtype else ""
            yield label, _sa_split_case(device, dtype, shape, cl, bias_dtype, finish_elems)


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


def _sa_split_case(device, dtype, shape, channels_last, bias_dtype, finish_elems):
    """_sa_case with the launcher's program target raised so the backward splits its channel blocks."""
    from nfkernels.ops import scaled_act as sa

    def run():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sa, "CPU_PROGRAMS", 64)
            mp.setattr(sa, "SPLIT_MIN_ELEMS", 1)
            if finish_elems:
                mp.setattr(sa, "FINISH_ELEMS", finish_elems)
            _sa_case(device, "gelu", dtype, shape, channels_last, True, True, bias_dtype)()

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
    for dtype in (torch.bfloat16, torch.float16):  # H·W split: partial sums, the finish and dz kernels
        for cl in (False, True):
            yield _se_label(dtype, (1, 4, 48, 48), cl, True), _se_case(device, dtype, (1, 4, 48, 48), cl, True)
    yield (_se_label(torch.bfloat16, (1, 4, 48, 48), True, True) + " fp32 params",
           _se_case(device, torch.bfloat16, (1, 4, 48, 48), True, True, param_dtype=torch.float32))


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
    # NFNet-F0 row lengths: the vector-row tiles (768, 1152 and 1536 columns) next to singles.
    "F0 rows": [((4, 768), 0), ((2, 1152), 0), ((2, 1536), 0), ((6, 1, 1, 1), 0)],
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
    for set_name in ("long rows", "one element", "unaligned", "F0 rows"):
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
    recording = Recording(KERNELS, TARGETS)
    with recorders_installed(recording), nfkernels.use_backend("triton"):
        for make in SCENARIOS:
            for label, run in make(device):
                recording.scenario = label
                try:
                    run()
                except Exception as err:  # noqa: BLE001 (reported by test_scenarios_run)
                    recording.scenario_errors.append(f"{label}: {type(err).__name__}: {err}")
    return recording


# ----------------------------------------------------------------------------- fixtures and tests


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(recording, {target: {job id: result}}, seconds): recorded once, compiled once per module."""
    reason = ptxas_missing()
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
    jobs_by_target = recording.jobs_by_target()
    results = compile_all(jobs_by_target, tmp_path_factory.mktemp("kernels_compile"), metrics=True)
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


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_no_spills(compiled, target):
    """No specialization of any kernel spills registers to local memory (ptxas -v: spill stores
    or loads), on either target: a spill turns a streaming kernel's register traffic into memory
    traffic. Specializations that do not compile are test_kernel_compiles' failures, not these."""
    recording, results = compiled
    failures = []
    checked = 0
    for (kernel, t), jobs in sorted(recording.jobs.items()):
        if t != target:
            continue
        for job in jobs.values():
            result = results[target].get(job["id"], {})
            if not result.get("ok"):
                continue
            metrics = result.get("metrics")
            if metrics is None:
                failures.append(f"- {kernel} [{target}] {job['description']}: no ptxas metrics "
                                f"({result.get('metrics_error', 'none recorded')})")
                continue
            checked += 1
            if spills(metrics):
                failures.append(f"- {kernel} [{target}] {job['description']}\n  from: {'; '.join(job['scenarios'])}\n"
                                f"  {metrics['registers']} registers, {metrics['spill_stores']} bytes spill stores, "
                                f"{metrics['spill_loads']} bytes spill loads, {metrics['stack']} bytes stack frame")
    assert checked, f"no compiled specialization with metrics for {target}"
    if failures:
        pytest.fail(f"{len(failures)} specializations fail for {target}:\n" + "\n".join(failures), pytrace=False)
