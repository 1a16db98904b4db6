"""nfkernels imports and runs its torch path where triton is not installed (macOS, Windows,
minimal CPU installs), and a Triton backend asked for there says why it cannot run.

Each check runs in a fresh interpreter in which ``import triton`` fails (``sys.modules["triton"]
= None``, what Python itself does for a module it knows to be absent)."""
import os
import subprocess
import sys
import textwrap

import pytest

BLOCK_TRITON = """
import sys
for name in ("triton", "triton.language", "triton.runtime", "triton.runtime.jit"):
    sys.modules[name] = None
"""


def run_without_triton(body: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NFK_BACKEND",)}
    code = BLOCK_TRITON + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_import_and_every_op_on_the_torch_path():
    out = run_without_triton("""
        import torch
        import nfkernels as nfk
        from nfkernels import _backend
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        assert not _backend.triton_available()
        torch.manual_seed(0)
        w, gain = torch.randn(8, 4, 3, 3, dtype=torch.float64), torch.rand(8, 1, 1, 1, dtype=torch.float64) + 0.5
        w_hat = nfk.weight_standardize(w, gain, gamma=1.0, eps=1e-5)
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        expected = (w - mean) / torch.sqrt(var + 1e-5) * gain / fan_in ** 0.5
        torch.testing.assert_close(w_hat, expected, rtol=1e-12, atol=1e-12)
        x, b = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        y = nfk.scaled_act(x, b, act="relu", gamma=1.5)
        torch.testing.assert_close(y, 1.5 * torch.clamp(x + b.view(1, -1, 1, 1), min=0), rtol=1e-12, atol=0)
        model = nfk.models.NFNet(nfk.models.TINY_CONFIG, num_classes=3)
        loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        loss.backward()
        opt = nfk.optim.SGD_AGC(model.parameters(), lr=0.1, momentum=0.9, clip_factor=0.01)
        nfk.agc_(nfk.agc_parameters(model), clip_factor=0.01)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        print("OK")
    """)
    assert out.strip().endswith("OK")


@pytest.mark.parametrize("how", ["set_backend", "use_backend"])
def test_an_explicit_triton_backend_says_triton_is_missing(how):
    out = run_without_triton(f"""
        import torch
        import nfkernels as nfk
        w, gain = torch.randn(8, 4, 3, 3), torch.ones(8, 1, 1, 1)
        try:
            if {how!r} == "set_backend":
                nfk.set_backend("triton")
                nfk.weight_standardize(w, gain)
            else:
                with nfk.use_backend("triton"):
                    nfk.weight_standardize(w, gain)
        except RuntimeError as error:
            print("RAISED:", error)
    """)
    assert "RAISED:" in out
    message = out.split("RAISED:", 1)[1]
    assert "backend 'triton' needs the triton package" in message and "pip install triton" in message


def test_a_kernel_launched_without_triton_raises_instead_of_running_nothing():
    """The stand-in is a second line of defence behind backend selection: a launch that slipped
    through must fail loudly, never be a silent no-op that leaves outputs unwritten."""
    out = run_without_triton("""
        from nfkernels.ops import _triton
        from nfkernels.ops.weight_standardize import _weight_standardize_fwd_kernel as kernel
        assert not _triton.available() and _triton.triton.cdiv(7, 2) == 4
        try:
            kernel[(1,)]()
        except RuntimeError as error:
            print("RAISED:", error)
    """)
    assert "RAISED: Triton kernel _weight_standardize_fwd_kernel cannot run: triton is not installed" in out
