"""``python -m bench.kernel_report`` (issue 13): its parts on known inputs (ptxas and PTX/SASS
parsing, program sampling, the interpreter probe that counts lanes and bytes, the convolution
stand-in), then one ``--quick`` run through the main job (``python -m bench --only kernel_report``)
whose output structure is checked, and in which no specialization may spill."""
from __future__ import annotations

import contextlib
import io
import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from bench import __main__ as bench_main  # noqa: E402
from bench import common, kernel_report  # noqa: E402
from bench.kernel_compile import (parse_ptxas_log, ptx_memory_widths, ptxas_missing, sass_memory_widths,  # noqa: E402
                                  spills)
from nfkernels import _backend  # noqa: E402

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_sgd_agc_kernel' for 'sm_90a'
ptxas info    : Function properties for _sgd_agc_kernel
    48 bytes stack frame, 40 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size
ptxas info    : Compiling entry function '_ZN3nfk10agc_kernelIffEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN3nfk10agc_kernelIffEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem
"""


def test_ptxas_log_is_parsed_per_function():
    functions = parse_ptxas_log(PTXAS_LOG)
    assert functions["_sgd_agc_kernel"] == {"registers": 255, "spill_stores": 40, "spill_loads": 44, "stack": 48,
                                            "smem": 0}
    assert functions["_ZN3nfk10agc_kernelIffEEvPT_"] == {"registers": 32, "spill_stores": 0, "spill_loads": 0,
                                                         "stack": 0, "smem": 128}
    assert spills(functions["_sgd_agc_kernel"]) == 84 and spills(functions["_ZN3nfk10agc_kernelIffEEvPT_"]) == 0


def test_global_access_widths_from_ptx_and_sass():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
    ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
    ld.shared.v4.b32 { %r7, %r8, %r9, %r10 }, [ %r11 + 0 ];
    @%p2 st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
    st.global.b64 [ %rd5 + 0 ], %rd6;
    atom.global.gpu.acq_rel.add.u32 %r12, [ %rd7 + 0 ], 1;
    """
    assert ptx_memory_widths(ptx) == {"ld": {"128": 1, "64": 1, "16": 1}, "st": {"128": 1, "64": 1},
                                      "atom": {"32": 1}}
    sass = """
        /*0060*/  LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;
        /*0070*/  LDG.E.U16 R8, desc[UR6][R2.64+0x10] ;
        /*0080*/  LDG.E R9, desc[UR6][R2.64+0x20] ;
        /*0090*/  LDG.E.64 R10, desc[UR6][R2.64+0x30] ;
        /*00a0*/  STG.E.128 desc[UR6][R6.64], R4 ;
        /*00b0*/  LDS.128 R12, [R0] ;
    """
    assert sass_memory_widths(sass) == {"ld": {"128": 1, "16": 1, "32": 1, "64": 1}, "st": {"128": 1}, "atom": {}}


@pytest.mark.parametrize("grid, budget", [((5, 1, 1), 8), ((1000, 1, 1), 10), ((1000, 1, 1), 2), ((40, 7, 3), 30),
                                          ((3, 300, 1), 16), ((17, 1, 1), 17)])
def test_sampled_programs_stand_for_the_whole_grid(grid, budget):
    programs = kernel_report.sample_programs(grid, budget, random.Random(0))
    total = grid[0] * grid[1] * grid[2]
    assert sum(w for _, w in programs) == total
    assert len({pid for pid, _ in programs}) == len(programs)
    assert all(0 <= p < g for pid, _ in programs for p, g in zip(pid, grid))
    if total <= budget:
        assert len(programs) == total and all(w == 1 for _, w in programs)
    else:
        pids = {pid for pid, _ in programs}
        assert (0, 0, 0) in pids and tuple(g - 1 for g in grid) in pids  # the partial tiles are at the ends


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _masked_double_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, _twice(tl.load(src_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def _row_sums_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(src_ptr + tl.program_id(0) * n + offs, mask=offs < n, other=0.0)
    tl.store(dst_ptr + tl.program_id(0), tl.sum(x, axis=0))


@triton.jit
def _unmasked_copy_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs))


needs_interpreter = pytest.mark.skipif(not _backend.triton_interpreting(),
                                       reason="the probe runs kernels in Triton's interpreter (TRITON_INTERPRET=1)")


def _probe(kernel, grid, args, kwargs, budget=1000):
    regions = [kernel_report._extent(a) for a in args if isinstance(a, torch.Tensor)]
    probe = kernel_report.Probe(regions, lambda: (np.zeros(0, dtype=np.uint64),) * 2)
    with kernel_report.interpreter_patched([kernel]):
        return probe.run(kernel, grid, args, kwargs, budget, 10.0, random.Random(0))


@needs_interpreter
def test_probe_counts_active_lanes_and_bytes():
    src, dst = torch.randn(200), torch.full((200,), float("nan"))
    totals = _probe(_masked_double_kernel, (2, 1, 1), (src, dst, 200), {"BLOCK": 128})
    assert totals["programs_run"] == 2
    assert totals["lanes"] == {"ld": 256, "st": 256, "atom": 0}
    assert totals["active"] == {"ld": 200, "st": 200, "atom": 0}  # the second tile is 72 of 128
    assert totals["bytes"] == {"ld": 800, "st": 800, "atom": 0}
    assert totals["flags"] == {0: {"ld"}, 1: {"st"}} and totals["reductions"] == 0
    torch.testing.assert_close(dst, 2 * src)  # the programs really ran


@needs_interpreter
def test_probe_weights_a_sample_and_counts_reductions():
    src, dst = torch.randn(64, 100), torch.empty(64)
    exact = _probe(_row_sums_kernel, (64, 1, 1), (src, dst, 100), {"BLOCK": 128})
    sampled = _probe(_row_sums_kernel, (64, 1, 1), (src, dst, 100), {"BLOCK": 128}, budget=5)
    assert exact["programs_run"] == 64 and sampled["programs_run"] == 5
    assert exact["reductions"] == 64 == sampled["reductions"]
    assert exact["bytes"] == sampled["bytes"] == {"ld": 64 * 400, "st": 64 * 4, "atom": 0}  # identical programs


@needs_interpreter
def test_probe_refuses_an_access_outside_every_tensor():
    src = torch.randn(1024)[:200]  # the overrun stays inside this allocation: refused, and harmless if not
    dst = torch.empty(256)
    with pytest.raises(kernel_report.OutOfBounds, match=r"program \(1, 0, 0\): ld of 56 element"):
        _probe(_unmasked_copy_kernel, (2, 1, 1), (src, dst), {"BLOCK": 128})


def test_op_floor_counts_inputs_once_and_leaves_out_scratch():
    """An op of two launches: both read ``a``; the first writes ``t``, which the second reads and
    which is gone when the op returns (scratch); the second writes ``out`` (kept), and updates
    ``w`` in place. Floor: a once, w twice (read and write), out once; not t."""
    from torch.multiprocessing.reductions import StorageWeakRef

    a, t, out, w = torch.empty(100), torch.empty(10), torch.empty(100, dtype=torch.bfloat16), torch.empty(7)

    def regions(*tensors):
        return [{"start": s, "end": e, "float": True, "ref": StorageWeakRef(x.untyped_storage())}
                for x in tensors for s, e in [kernel_report._extent(x)]]

    def totals(flags, moved):
        return {"flags": flags, "bytes": {"ld": moved, "st": 0, "atom": 0}}

    call = kernel_report._OpCall(0, "op forward", "op.f", "forward", None)
    call.add(regions(a, t), totals({0: {"ld"}, 1: {"st"}}, 440), gathered=False)
    call.add(regions(a, t, out, w), totals({0: {"ld"}, 1: {"ld"}, 2: {"st"}, 3: {"ld", "st"}}, 696),
             gathered=False)
    del t
    result = call.close()
    assert result["measured_bytes"] == 440 + 696
    assert result["floor_bytes"] == 400 + 200 + 2 * 28
    assert result["scratch_bytes"] == 40


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_stand_in_matches_a_real_conv_in_all_but_values(layout):
    """Shape, dtype (autocast: bf16) and memory format of the output and of every gradient."""
    x = torch.randn(2, 8, 11, 9).to(memory_format=layout).requires_grad_()
    w = torch.randn(16, 4, 3, 3).to(memory_format=layout).requires_grad_()
    b = torch.randn(16, requires_grad=True)
    for autocast in (False, True):
        outs, grads = [], []
        for conv in (F.conv2d, kernel_report._conv2d_stand_in):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = conv(x, w, b, (2, 1), (1, 0), 1, 2)
            gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            outs.append(y)
            grads.append((gx, gw, gb))
        real, stand_in = outs
        assert stand_in.shape == real.shape and stand_in.dtype == real.dtype
        assert stand_in.is_contiguous(memory_format=layout) == real.is_contiguous(memory_format=layout)
        for r, s in zip(*grads):
            assert s.shape == r.shape and s.dtype == r.dtype


# ----------------------------------------------------------------------------- one --quick run


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """(results folder, everything printed, the JSON) of `python -m bench --quick --only kernel_report`."""
    results = tmp_path_factory.mktemp("results")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(common, "RESULTS_DIR", results)
        assert bench_main.main(["--quick", "--only", "kernel_report"]) == 0
    report = json.loads((results / "kernel_report_quick_sm90a.json").read_text())
    return results, out.getvalue(), report


def test_report_is_written_and_listed(quick_report):
    results, output, report = quick_report
    md = (results / "kernel_report_quick_sm90a.md").read_text()
    assert sorted(p.name for p in results.iterdir()) == ["kernel_report_quick_sm90a.json",
                                                          "kernel_report_quick_sm90a.md"]
    summary = output[output.rindex("Summary:"):]
    assert all(str(p) in summary for p in results.iterdir())
    assert "## Targets (issue 13)" in md and "## Triton kernels, nchw" in md and "## CUDA kernels" in md


def test_report_covers_every_op_of_the_step(quick_report):
    _, _, report = quick_report
    assert [t["status"] in ("met", "NOT MET", "not measured") for t in report["targets"]] == [True] * 4
    data = report["layouts"]["nchw"]
    assert "failed" not in data, data.get("failed")
    assert not [e for e in report["errors"] if "not recorded" in e or "nchw forward" in e or "nchw backward" in e]
    assert data["launches"] > 100 and data["agc_launches"] >= 1
    ops = {o["op"] for o in data["ops"]}
    for op in ("scaled_act forward", "scaled_act backward", "se_gate forward", "se_gate backward",
               "weight_standardize forward", "weight_standardize backward", "sgd_agc optimizer", "agc agc_"):
        assert op in ops, sorted(ops)
    for o in data["ops"]:
        assert o["floor_bytes"] > 0 and o["measured_bytes"] >= 0.9 * o["floor_bytes"], o
    rows = data["specializations"]
    assert sum(r["launches"] for r in rows) == data["launches"]
    for r in rows:
        assert r["programs_per_sm_min"] == pytest.approx(r["programs_min"] / kernel_report.SMS)
        if not r["measure_errors"]:
            assert 0 < r["active_min"] <= r["active_overall"] <= 1 and r["floor_bytes"] > 0, r["spec"]
    if ptxas_missing() is None:
        assert all(isinstance(r["registers"], int) and r["widths"]["ld"] for r in rows), \
            [(r["spec"], r["compile_error"]) for r in rows if r["registers"] is None]


def test_autocast_dtypes_are_a_cuda_bf16_steps(quick_report):
    """bf16 activations, Ŵ written in bf16 from fp32 weights, fp32 biases and parameters."""
    _, _, report = quick_report
    rows = report["layouts"]["nchw"]["specializations"]
    for r in rows:
        if "scaled_act forward" in r["ops"] or "se_gate forward" in r["ops"]:
            assert re.search(r"\b(x|h)_ptr:\*bf16", r["description"]), r["description"]
        if r["kernel"].startswith("_weight_standardize_fwd"):
            assert re.search(r"\bw_ptr:\*fp32", r["description"]) and re.search(r"\bout_ptr:\*bf16", r["description"])
        if r["kernel"].startswith("_sgd_agc"):
            assert re.search(r"\bp_ptr:\*fp32", r["description"]) and re.search(r"\bg_ptr:\*fp32", r["description"])


def test_no_specialization_spills(quick_report):
    """Issue 13's first target, in CI: no Triton specialization of the F0 step (sm_90a) and no CUDA
    kernel (sm_90, where nvcc exists) spills registers."""
    _, _, report = quick_report
    if ptxas_missing() is not None:
        pytest.skip(ptxas_missing())
    spilling = [f"{r['spec']}: {spills(r)} B ({r['registers']} registers)"
                for r in report["layouts"]["nchw"]["specializations"] if spills(r)]
    spilling += [f"CUDA {k['kernel']} ({k['source']}): {spills(k)} B ({k['registers']} registers)"
                 for k in report["cuda"].get("kernels", []) if spills(k)]
    assert not spilling, "spilling:\n" + "\n".join(spilling)
