"""scaled_act against independent float64 math, forward and backward, every backend."""
import math
import os

import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import scaled_act as sa_op
from nfk_testing import DEVICE, assert_close, backends_for, rel_err, tolerance

BACKENDS = backends_for(("torch", "triton", "cuda"))

# The interpreter runs tl.sigmoid's exp in numpy, which warns when exp(−x) overflows to inf for
# very negative x; the sigmoid is then exactly 0, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946


def _sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _softplus(z):
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-z.abs()))


# f written from the formulas (not the library's table of torch functions); gradients come from
# autograd through these expressions.
FORMULAS = {
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z**3))),
    "relu": lambda z: torch.where(z > 0, z, 0 * z),
    "silu": lambda z: z * _sigmoid(z),
    "relu6": lambda z: torch.where(z > 6, 0 * z + 6, torch.where(z > 0, z, 0 * z)),
    "elu": lambda z: torch.where(z > 0, z, torch.expm1(z)),
    "celu": lambda z: torch.where(z > 0, z, torch.expm1(z)),
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "selu": lambda z: SELU_LAMBDA * torch.where(z > 0, z, SELU_ALPHA * torch.expm1(z)),
    "sigmoid": _sigmoid,
    "tanh": torch.tanh,
    "softplus": _softplus,
    "softsign": lambda z: z / (1 + z.abs()),
    "log_sigmoid": lambda z: -_softplus(-z),
    "identity": lambda z: z,
}
ACTS = list(FORMULAS)

SHAPES = {
    "nchw_odd": ((2, 3, 5, 7), False),
    "one_by_one": ((1, 7, 1, 1), False),
    "linear_127": ((3, 127), False),
    "channels_last_odd": ((2, 5, 9, 13), True),
}


def reference(x, bias, act, gamma, scale):
    z = x if bias is None else x + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return gamma * scale * FORMULAS[act](z)


def make_inputs(shape, dtype, with_bias=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spread 3 so relu6's upper clamp and the saturating tails are exercised; never zero.
    x = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.05
    bias = 0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64) if with_bias else None
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = bias.to(DEVICE, dtype) if bias is not None else None
    return x, bias, dout.to(DEVICE, dtype)


def run_and_grad(x, bias, dout, backend, **kw):
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    with nfk.use_backend(backend):
        out = nfk.scaled_act(x, bias, **kw)
    out.backward(dout)
    return out, x.grad, (bias.grad if bias is not None else None)


def reference_and_grad(x, bias, dout, act, gamma, scale):
    x64 = x.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    out = reference(x64, b64, act, gamma, scale)
    out.backward(dout.double())
    return out, x64.grad, (b64.grad if b64 is not None else None)


def plain_torch_in_dtype(x, bias, dout, act, gamma, scale):
    """The same formula computed by plain PyTorch ops without upcasting, for the bf16/fp16 bound."""
    xx = x.detach().clone().requires_grad_(True)
    bb = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out = reference(xx, bb, act, gamma, scale)
    out.backward(dout)
    return out, xx.grad, (bb.grad if bb is not None else None)


def check_all(got, want, tol):
    for name, g, w in zip(("forward", "dx", "dbias"), got, want):
        if w is None:
            assert g is None, name
        else:
            assert_close(g, w, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_matches_float64(backend, act, shape_name, dtype):
    shape, channels_last = SHAPES[shape_name]
    seed = ACTS.index(act) * 10 + list(SHAPES).index(shape_name)
    x, bias, dout = make_inputs(shape, dtype, channels_last=channels_last, seed=seed)
    gamma = nfk.NF_GAMMA[act]
    got = run_and_grad(x, bias, dout, backend, act=act, scale=0.8)
    want = reference_and_grad(x, bias, dout, act, gamma, 0.8)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert got[2].shape == bias.shape and got[2].dtype == bias.dtype
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    else:
        assert got[0].is_contiguous() and got[1].is_contiguous()
    check_all(got, want, tolerance(dtype, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_without_bias(backend, act, channels_last):
    x, _, dout = make_inputs((2, 4, 3, 5), torch.float64, with_bias=False, channels_last=channels_last, seed=21)
    got = run_and_grad(x, None, dout, backend, act=act, gamma=1.3, scale=0.9)
    want = reference_and_grad(x, None, dout, act, 1.3, 0.9)
    check_all(got, want, tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch(backend, act, dtype):
    x, bias, dout = make_inputs((3, 6, 5, 4), dtype, channels_last=True, seed=3)
    gamma = nfk.NF_GAMMA[act]
    got = run_and_grad(x, bias, dout, backend, act=act)
    want = reference_and_grad(x, bias, dout, act, gamma, 1.0)
    plain = plain_torch_in_dtype(x, bias, dout, act, gamma, 1.0)
    for name, g, w, base in zip(("forward", "dx", "dbias"), got, want, plain):
        assert g.dtype == dtype, name
        assert_close(g, w, tolerance(dtype, backend, rel_err(base, w)), name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_channels_last", [False, True], ids=["x_nchw", "x_channels_last"])
def test_grad_in_other_memory_format(backend, x_channels_last):
    x, bias, dout = make_inputs((2, 6, 4, 3), torch.float64, channels_last=x_channels_last, seed=31)
    other = torch.contiguous_format if x_channels_last else torch.channels_last
    dout = dout.contiguous(memory_format=other)
    got = run_and_grad(x, bias, dout, backend, act="silu")
    want = reference_and_grad(x, bias, dout, "silu", nfk.NF_GAMMA["silu"], 1.0)
    fmt = torch.channels_last if x_channels_last else torch.contiguous_format
    assert got[1].is_contiguous(memory_format=fmt)
    check_all(got, want, tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["3d_nlc", "5d_channels_last_3d", "strided_slice"])
def test_other_layouts(backend, case):
    if case == "3d_nlc":
        x, bias, dout = make_inputs((3, 5, 7), torch.float64, seed=41)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel innermost: runs without a copy
    elif case == "5d_channels_last_3d":
        x, bias, dout = make_inputs((2, 3, 3, 4, 5), torch.float64, seed=42)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x, bias, dout = make_inputs((2, 8, 5, 6), torch.float64, seed=43)
        x, dout = x[:, ::2], dout[:, ::2]  # no dense view: the op copies, the result is still right
        bias = bias[::2]  # a strided bias is read with its stride
    got = run_and_grad(x, bias, dout, backend, act="gelu_tanh", scale=1.1)
    want = reference_and_grad(x, bias, dout, "gelu_tanh", nfk.NF_GAMMA["gelu_tanh"], 1.1)
    if case == "5d_channels_last_3d":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    check_all(got, want, tolerance(torch.float64, backend))


# Tiles of a few elements and many programs per channel block: rows in several chunks plus
# remainder pieces, channel blocks split over groups whose dbias the last program finishes.
SMALL_TILES = dict(TILE_ELEMS=16, MAX_CHUNK=4, MAX_BLOCK_C=4, CPU_PROGRAMS=64, SPLIT_MIN_ELEMS=1, FINISH_ELEMS=4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias_grad", "bias_frozen"])
def test_many_tiles_and_split_channel_blocks(monkeypatch, channels_last, bias_grad):
    """Small blocks: 9·13 = 117 = 29·4 + 1 (four-wide chunks and a one-wide remainder), channel
    blocks of 4 channels split over several programs each."""
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(sa_op, name, value)
    x, bias, dout = make_inputs((2, 5, 9, 13), torch.float32, channels_last=channels_last, seed=51)
    n, c, hw = (2 * 9 * 13, 5, 1) if channels_last else (2, 5, 9 * 13)
    plan = sa_op._plan(n, c, hw, 4, x.device, reduces=bias_grad)
    assert plan.groups > 1
    assert (plan.chunk, hw % plan.chunk) == ((1, 0) if channels_last else (4, 1))
    xx = x.detach().requires_grad_(True)
    bb = bias.detach().requires_grad_(bias_grad)
    with nfk.use_backend("triton"):
        out = nfk.scaled_act(xx, bb, act="elu", scale=0.7)
    out.backward(dout)
    want = reference_and_grad(x, bias, dout, "elu", nfk.NF_GAMMA["elu"], 0.7)
    tol = tolerance(torch.float32, "triton")
    assert_close(out, want[0], tol, "forward")
    assert_close(xx.grad, want[1], tol, "dx")
    if bias_grad:
        assert_close(bb.grad, want[2], tol, "dbias")
    else:
        assert bb.grad is None


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dbias_is_deterministic_split_or_not(monkeypatch, count_launches, channels_last):
    """The dbias the last program of a split channel block finishes is the same, bit for bit, on
    every run, and matches the unsplit kernel's to rounding (only the order of the sums differs);
    split or not, the backward is one kernel launch."""
    x, bias, dout = make_inputs((3, 6, 6, 6), torch.float32, channels_last=channels_last, seed=52)
    unsplit = run_and_grad(x, bias, dout, "triton", act="gelu")[2]
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(sa_op, name, value)
    bwd = count_launches(sa_op, "_scaled_act_bwd_kernel")
    first, again = (run_and_grad(x, bias, dout, "triton", act="gelu")[2] for _ in range(2))
    assert bwd.count == 2
    assert torch.equal(first, again)
    want = reference_and_grad(x, bias, dout, "gelu", nfk.NF_GAMMA["gelu"], 1.0)[2]
    assert_close(first, want, 1e-5, "split dbias")
    assert_close(unsplit, want, 1e-5, "dbias")


# NFNet-F0's activations at 192 px, batch 32: NCHW (C, H·W) and channels-last C.
F0_NCHW = [(16, 9216), (32, 9216), (64, 9216), (128, 2304), (256, 2304), (256, 576), (512, 576), (768, 144),
           (1536, 144), (768, 36), (1536, 36)]
F0_CHANNELS_LAST = [(16, 9216), (32, 9216), (64, 9216), (128, 2304), (256, 2304), (512, 576), (768, 144), (1536, 36)]


@pytest.mark.parametrize("esize", [2, 4], ids=["bf16", "fp32"])
def test_f0_tiles_fit_the_rows(esize):
    """At every F0 shape the tiles leave at most 10% of the lanes idle (H·W = 9·2^k is no power of
    two: 36 = 2·16 + 4), the vectors are 16 bytes where the rows allow (H·W = 36 in bf16: 8), and
    the backward splits a channel block only where there are few, so that the 6×6 stage finishes
    its dbias in one program per block."""
    cuda = torch.device("cuda", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sa_op, "_programs_target", lambda device: sa_op.PROGRAMS_PER_SM * 132)  # an H100
        for c, hw in F0_NCHW:
            p = sa_op._plan(32, c, hw, esize, cuda, reduces=True)
            assert sa_op._issued_fraction(hw, esize, p.chunk, p.block_n * p.block_c) >= 0.9, (c, hw)
            assert p.block_n * p.block_c * p.chunk <= sa_op.TILE_ELEMS
            assert sa_op._vector_width(esize, p.chunk, hw & -hw) == (4 if hw == 36 and esize == 2 else 16 // esize)
            assert hw > 144 or p.groups == 1, (c, hw, p.groups)
        for c, hw in F0_CHANNELS_LAST:
            p = sa_op._plan(32 * hw, c, 1, esize, cuda, reduces=True)
            assert c % p.block_c == 0 and p.block_c * esize >= 32
            assert p.channel_blocks * p.groups >= 2 * 132, c  # enough programs for the device
            assert p.groups * c * 4 <= 0.05 * 32 * hw * c * esize  # partial sums: a few % of dx


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_autocast_dtypes_at_a_6x6_stage(channels_last):
    """What a bf16-autocast training step runs at F0's 6×6 stage, scaled down: bf16 activations
    with an fp32 bias, H·W = 36 (8-byte vectors, a 4-wide remainder); dbias comes back in fp32."""
    x, _, dout = make_inputs((2, 8, 6, 6), torch.bfloat16, channels_last=channels_last, seed=53)
    bias = 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(54), dtype=torch.float64)
    bias = bias.to(DEVICE, torch.float32)
    got = run_and_grad(x, bias, dout, "triton", act="gelu")
    want = reference_and_grad(x, bias, dout, "gelu", nfk.NF_GAMMA["gelu"], 1.0)
    plain = plain_torch_in_dtype(x, bias.to(torch.bfloat16), dout, "gelu", nfk.NF_GAMMA["gelu"], 1.0)
    assert got[2].dtype == torch.float32
    for name, g, w, base in zip(("forward", "dx", "dbias"), got, want, plain):
        assert_close(g, w, tolerance(torch.bfloat16, "triton", rel_err(base, w)), name)


# The CUDA kernels' work split (csrc/activations.cuh: make_act_plan, ActThread) walked on the
# host: every element once, by a thread of its channel, in whole aligned vectors when the plan
# says so; at F0's shapes at least 90% of the thread steps useful. Their numerics are checked on a
# GPU by the "cuda" backend cases above.
WORK_SPLIT_CHECK = r"""
#include <cstdio>
#include <vector>
#include "activations.cuh"
using namespace nfk;

// Returns the fraction of useful thread steps, or -1 on a wrong walk.
double walk(int64_t rows, int64_t cols, int64_t channels, bool on_rows, int vec, bool vector, bool reduces) {
  const ActPlan p = make_act_plan(MatrixView{rows, cols, channels, on_rows}, vec, vector, 2, reduces);
  std::vector<int> seen(rows * cols, 0);
  double issued = 0, useful = 0;
  for (int64_t block = 0; block < p.channel_blocks; ++block) {
    for (int64_t group = 0; group < p.groups; ++group) {
      int64_t steps = 0;
      for (int t = 0; t < kThreads; ++t) {
        int64_t s = 0;
        for (ActThread w(p, vec, t, block, group); w.more(); w.next(p), ++s) {
          const int64_t i = w.start(vec), end = w.stop();
          if (vector && (i % vec != 0 || i + vec > end)) return -1;
          for (int e = 0; e < vec && i + e < end; ++e, ++useful) {
            const int64_t c = on_rows ? (i + e) / cols % channels : (i + e) % cols;
            if (c != (on_rows ? w.channel : w.channel + e)) return -1;
            ++seen[i + e];
          }
        }
        steps = s > steps ? s : steps;
      }
      issued += static_cast<double>(steps) * kThreads * vec;
    }
  }
  for (int count : seen) {
    if (count != 1) return -1;
  }
  return issued > 0 ? useful / issued : 1;
}

int main() {
  for (int64_t n : {1, 3, 33})
    for (int64_t c : {1, 3, 8, 12, 67, 130})
      for (int64_t hw : {1, 3, 4, 9, 36, 49})
        for (int vec : {1, 2, 4, 8})
          for (bool reduces : {true, false}) {
            if (walk(n * c, hw, c, true, vec, hw % vec == 0, reduces) < 0) printf("bad nchw %ld %ld %ld\n", n, c, hw);
            if (hw == 1 && walk(n, c, c, false, vec, c % vec == 0, reduces) < 0) printf("bad cl %ld %ld\n", n, c);
          }
  const int64_t nchw[][2] = {%NCHW%}, cl[][2] = {%CL%};
  for (bool reduces : {true, false}) {
    for (const auto& s : nchw) {  // bf16: 8-wide vectors, 4-wide for H·W = 36
      const int vec = s[1] % 8 == 0 ? 8 : 4;
      printf("nchw %ld %ld %.3f\n", s[0], s[1], walk(32 * s[0], s[1], s[0], true, vec, true, reduces));
    }
    for (const auto& s : cl) {
      printf("cl %ld %ld %.3f\n", s[0], s[1], walk(32 * s[1], s[0], s[0], false, 8, true, reduces));
    }
  }
  return 0;
}
"""


def test_cuda_work_split_covers_every_element_once(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        pytest.skip("needs nvcc to compile the CUDA headers for the host")
    pairs = lambda shapes: ", ".join(f"{{{c}, {hw}}}" for c, hw in shapes)  # noqa: E731
    source = WORK_SPLIT_CHECK.replace("%NCHW%", pairs(F0_NCHW)).replace("%CL%", pairs(F0_CHANNELS_LAST))
    (tmp_path / "walk.cu").write_text(source)
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    subprocess.run([nvcc, "-std=c++17", "-O1", f"-I{csrc}", str(tmp_path / "walk.cu"), "-o", str(tmp_path / "walk")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "walk")], check=True, capture_output=True, text=True).stdout
    assert "bad" not in out, out
    busy = [float(line.split()[-1]) for line in out.splitlines()]
    assert len(busy) == 2 * (len(F0_NCHW) + len(F0_CHANNELS_LAST)) and min(busy) >= 0.9, out


# f'(NaN) as torch's elementwise backward formulas define it (its CUDA kernels, and its CPU
# kernels' scalar loops): they test z ≤ 0 (relu; relu6 also z ≥ 6; elu, celu, selu) or z > 0
# (leaky_relu) and take the other branch when the comparison is false, as it is for NaN. The
# smooth activations give NaN. f(NaN) is NaN for every activation.
GRAD_AT_NAN = {act: math.nan for act in FORMULAS}
GRAD_AT_NAN.update(relu=1.0, relu6=1.0, elu=1.0, celu=1.0, leaky_relu=0.01, selu=SELU_LAMBDA, identity=1.0)
# torch's vectorized CPU backward of these gives 0 (relu6) or NaN (elu, celu, selu) at NaN inside
# the SIMD body and the formula's value in the scalar tail, so the torch backend on CPU tensors
# has no single f'(NaN) there to check.
TORCH_CPU_NAN_GRAD_VARIES = {"relu6", "elu", "celu", "selu"}

TORCH_FUNCTIONS = {
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "relu": torch.relu, "silu": torch.nn.functional.silu, "relu6": torch.nn.functional.relu6,
    "elu": torch.nn.functional.elu, "celu": torch.nn.functional.celu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01), "selu": torch.selu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "softsign": torch.nn.functional.softsign,
    "log_sigmoid": torch.nn.functional.logsigmoid, "identity": lambda z: z,
}


@pytest.mark.parametrize("act", ACTS)
def test_nan_table_is_torchs(act):
    """GRAD_AT_NAN is torch's own answer: one element, so torch's scalar formula runs."""
    z = torch.tensor([math.nan], dtype=torch.float64, requires_grad=True)
    y = TORCH_FUNCTIONS[act](z)
    y.backward(torch.ones_like(y))
    assert y.isnan().all()
    torch.testing.assert_close(z.grad, torch.tensor([GRAD_AT_NAN[act]], dtype=torch.float64), equal_nan=True,
                               rtol=0, atol=0)


def assert_nan_where_expected(got, want, tol, what, check=None):
    """NaN exactly where want has NaN, and the rest within tol (only where ``check``, if given)."""
    check = torch.ones_like(want, dtype=torch.bool) if check is None else check
    got_nan, want_nan = got.isnan() & check, want.isnan() & check
    same_nans = torch.equal(got_nan, want_nan)
    assert same_nans, f"{what}: {int(got_nan.sum())} NaNs where {int(want_nan.sum())} are expected"
    finite = ~want.isnan() & check
    assert_close(got[finite], want[finite], tol, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_propagates_like_torch(backend, act, channels_last, dtype):
    """NaN inputs give NaN outputs and torch's f'(NaN) in dx (issue 10, item 6); the other
    elements are unaffected. A max/min or `z > 0 ? z : 0` form would turn NaN into 0."""
    x, bias, dout = make_inputs((2, 3, 4, 5), dtype, channels_last=channels_last, seed=81)
    nan_at = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    nan_at[0, 1, 2, :3] = True
    nan_at[1, 1, 0, 4] = True
    x = x.masked_fill(nan_at, math.nan)
    gamma, scale = nfk.NF_GAMMA[act], 0.8
    got = run_and_grad(x, bias, dout, backend, act=act, scale=scale)
    out64, dx64, _ = reference_and_grad(x.masked_fill(nan_at, 1.0), bias, dout, act, gamma, scale)
    out64 = out64.detach().masked_fill(nan_at, math.nan)
    dx64 = torch.where(nan_at, dout.double() * (gamma * scale * GRAD_AT_NAN[act]), dx64)
    db64 = dx64.sum(dim=(0, 2, 3))  # NaN in channel 1 exactly when f'(NaN) is NaN
    tol = tolerance(dtype, backend)
    assert_nan_where_expected(got[0], out64, tol, "forward")
    if backend == "torch" and DEVICE.type == "cpu" and act in TORCH_CPU_NAN_GRAD_VARIES:
        assert_nan_where_expected(got[1], dx64, tol, "dx", check=~nan_at)
        assert_nan_where_expected(got[2], db64, tol, "dbias", check=torch.arange(3, device=DEVICE) != 1)
    else:
        assert_nan_where_expected(got[1], dx64, tol, "dx")
        assert_nan_where_expected(got[2], db64, tol, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_defaults_to_nf_table(backend):
    table = {"gelu": 1.7015043497085571, "relu": 1.7139588594436646, "silu": 1.7881293296813965,
             "gelu_tanh": 1.7015043497085571}
    for act, gamma in table.items():
        assert nfk.NF_GAMMA[act] == gamma
    x, bias, _ = make_inputs((2, 3, 4, 4), torch.float64, seed=61)
    with nfk.use_backend(backend):
        for act, gamma in table.items():
            out = nfk.scaled_act(x, bias, act=act)
            assert_close(out, reference(x, bias, act, gamma, 1.0), tolerance(torch.float64, backend), act)
        out = nfk.scaled_act(x, bias, act="relu", gamma=2.5, scale=0.5)
        assert_close(out, reference(x, bias, "relu", 2.5, 0.5), tolerance(torch.float64, backend), "explicit")
        out = nfk.scaled_act(x)  # default act is exact gelu with its NF gain
        assert_close(out, reference(x, None, "gelu", table["gelu"], 1.0), tolerance(torch.float64, backend), "default")
    assert set(nfk.NF_GAMMA) == set(FORMULAS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path(backend):
    x, bias, _ = make_inputs((4, 3, 3, 3), torch.float32, seed=71)
    with torch.no_grad(), nfk.use_backend(backend):
        out = nfk.scaled_act(x.requires_grad_(True), bias, act="softplus")
    assert not out.requires_grad
    assert_close(out, reference(x.double(), bias.double(), "softplus", nfk.NF_GAMMA["softplus"], 1.0), 2e-5, "fwd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = torch.empty(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        out = nfk.scaled_act(x, bias)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(bias.grad, torch.zeros(3, device=DEVICE))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_kernels_are_what_runs(count_launches):
    fwd = count_launches(sa_op, "_scaled_act_fwd_kernel")
    bwd = count_launches(sa_op, "_scaled_act_bwd_kernel")
    x, bias, dout = make_inputs((2, 3, 4, 4), torch.float32)
    run_and_grad(x, bias, dout, "triton")
    assert (fwd.count, bwd.count) == (1, 1)
    run_and_grad(x, bias, dout, "torch")
    assert (fwd.count, bwd.count) == (1, 1)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        nfk.scaled_act([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        nfk.scaled_act(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        nfk.scaled_act(torch.randn(5))
    with pytest.raises(ValueError, match="bias must have 4 elements"):
        nfk.scaled_act(x, torch.ones(3))
    with pytest.raises(TypeError, match="bias has dtype"):
        nfk.scaled_act(x, torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        nfk.scaled_act(x, [0.0] * 4)
    with pytest.raises(ValueError, match=r"act must be one of \(.*'gelu_tanh'"):
        nfk.scaled_act(x, act="swish")
    with pytest.raises(TypeError, match="gamma must be a real number"):
        nfk.scaled_act(x, gamma="1")
    with pytest.raises(TypeError, match="scale must be a real number"):
        nfk.scaled_act(x, scale=None)
    with pytest.raises(ValueError, match="scale must be finite"):
        nfk.scaled_act(x, scale=float("nan"))
    with pytest.raises(TypeError, match="dense"):
        nfk.scaled_act(x.reshape(2, -1).to_sparse())
