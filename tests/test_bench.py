"""The main job (python -m bench) runs its CPU fallback end to end and writes, per benchmark, a
JSON with every digit, a markdown table rounded for people with the providers explained, and a PNG
chart; it ends with a summary of every file it wrote. Results go to a temporary folder here."""
import contextlib
import io
import json
import re
import sys

import pytest

from bench import __main__ as bench_main
from bench import common, train_step

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The result names of one --quick run (on a CPU or a GPU alike).
STEMS = ("weight_standardize", "scaled_act_nchw", "se_gate_nchw", "agc_quick", "train_step_tiny_nchw", "step_profile")


# The timed benchmarks; kernel_report (no timing, no chart) has its own test, tests/test_kernel_report.py.
TIMED = [name for name, _, _ in bench_main.BENCHMARKS if name != "kernel_report"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(results folder, everything printed) of one `python -m bench --quick` of the timed benchmarks."""
    results = tmp_path_factory.mktemp("results")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(common, "RESULTS_DIR", results)
        assert bench_main.main(["--quick", "--only", *TIMED]) == 0
    return results, out.getvalue()


def result(results, stem: str, suffix: str):
    paths = list(results.glob(f"{stem}_*{suffix}"))  # one device slug per run
    assert len(paths) == 1, f"{stem}_<device>{suffix}: found {sorted(p.name for p in results.iterdir())}"
    return paths[0]


def test_main_job_runs_and_writes_results(quick_run):
    results, _ = quick_run
    for name in ("weight_standardize", "scaled_act_nchw", "se_gate_nchw"):
        data = json.loads(result(results, name, ".json").read_text())
        providers = {row["provider"] for row in data["rows"]}
        assert "eager" in providers and any(p.startswith("nfkernels ") for p in providers)
        assert all(row["ms"] > 0 and row["GB/s"] > 0 for row in data["rows"])
        assert result(results, name, ".md").exists()
    step = json.loads(result(results, "train_step_tiny_nchw", ".json").read_text())
    losses = {row["provider"]: row["loss_step0"] for row in step["rows"]}
    assert losses["nfkernels"] == pytest.approx(losses["reference"], rel=1e-5)  # same weights, same batch


def test_step_profile_counts_every_phase_of_every_provider(quick_run):
    """The host-cost profile (issue 12): device ops per phase for the reference and nfkernels,
    host times for nfkernels (its kernel launches are no-ops on a CPU), each optimizer alone."""
    results, _ = quick_run
    data = json.loads(result(results, "step_profile", ".json").read_text())
    rows = {(row["provider"], row["phase"]): row for row in data["rows"]}
    for provider in ("reference", "nfkernels", "nfkernels, grads kept"):
        phases = [rows[(provider, phase)]["device_ops"] for phase in ("forward", "backward", "optimizer")]
        assert all(n > 0 for n in phases) and sum(phases) == rows[(provider, "step")]["device_ops"]
    assert rows[("nfkernels", "step")]["device_ops"] < rows[("reference", "step")]["device_ops"]
    assert rows[("nfkernels", "step")]["ms"] > 0
    for name in ("nfkernels SGD_AGC.step()", "nfkernels agc_", "nfkernels agc_, new grads"):
        assert rows[(name, "alone")]["ms"] > 0
    md = result(results, "step_profile", ".md").read_text()
    assert "## Device ops by op" in md and "`nfkernels kernel _sgd_agc_kernel`" in md


def test_every_benchmark_writes_a_png_chart(quick_run):
    results, _ = quick_run
    for stem in STEMS:
        png = result(results, stem, ".png")
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
        assert f"]({png.name})" in result(results, stem, ".md").read_text()  # the table shows its chart


def significant_digits(number: str) -> int:
    digits = number.replace(".", "").lstrip("0")
    return len(digits if "." in number else digits.rstrip("0"))


def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


CELL_FORMATS = {
    "GB/s": r"\d+\.\d", "images/s": r"\d+\.\d", "peak_MB": r"(\d+\.\d)?",
    "frac_copy_bw": r"\d{1,2}\.\d\d|\d{3,}\.\d", "speedup_vs_ref": r"\d{1,2}\.\d\d|\d{3,}\.\d", "loss_step0": r"\d+\.\d{3}",
}


def test_tables_and_printed_numbers_are_rounded(quick_run):
    results, output = quick_run
    for stem in STEMS:
        rows = markdown_rows(result(results, stem, ".md").read_text())
        assert rows, stem
        for row in rows:
            for column, cell in row.items():
                if column.startswith("ms") and cell:  # empty: not measured (step_profile's CPU reference)
                    assert re.fullmatch(r"\d+(\.\d+)?", cell) and significant_digits(cell) <= 3, (stem, column, cell)
                elif column in CELL_FORMATS:
                    assert re.fullmatch(CELL_FORMATS[column], cell), (stem, column, cell)
    # Printed lines too: no number with five or more significant digits past a decimal point.
    for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", output):
        assert significant_digits(number) <= 4 or len(number.split(".")[1]) <= 1, number


def test_providers_and_axes_are_explained(quick_run):
    results, _ = quick_run
    for stem in STEMS:
        md = result(results, stem, ".md").read_text()
        assert "lower is better" in md and "milliseconds" in md
        data = json.loads(result(results, stem, ".json").read_text())
        for provider in {row["provider"] for row in data["rows"]}:
            note = re.search(rf"^- \*\*{re.escape(provider)}\*\*: (.+)$", md, re.M)
            assert note and len(note.group(1)) > 20, (stem, provider)
            assert data["providers"][provider] == note.group(1)


def test_summary_lists_every_file_written(quick_run):
    results, output = quick_run
    summary = output[output.rindex("Summary:"):]
    listed = {line.strip() for line in summary.splitlines()[1:] if line.startswith("  ")}
    written = {str(path) for path in results.iterdir()}
    assert listed == written
    assert len(written) == 3 * len(STEMS)


def test_missing_matplotlib_still_writes_tables_and_says_how_to_get_charts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    assert bench_main.main(["--quick", "--only", "weight_standardize"]) == 0
    output = capsys.readouterr().out
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    assert "![" not in result(tmp_path, "weight_standardize", ".md").read_text()
    assert "PNG chart skipped for weight_standardize" in output
    assert "PNG charts: 1 skipped, matplotlib is not installed (python3 -m pip install matplotlib" in output


def test_output_says_when_timm_does_not_import(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)
    assert bench_main.main(["--quick", "--only", "weight_standardize"]) == 0
    output = capsys.readouterr().out
    assert output.count("timm does not import here") == 2  # at the start and in the summary
    assert "timm not importable" in result(tmp_path, "weight_standardize", ".md").read_text()


def test_cpu_fallback_compares_with_timm_where_it_imports(quick_run):
    pytest.importorskip("timm")
    results, output = quick_run
    assert "imports: timm's own modules are the reference provider" in output
    for stem in ("scaled_act_nchw", "se_gate_nchw", "agc_quick"):
        data = json.loads(result(results, stem, ".json").read_text())
        assert {"timm", "eager"} <= {row["provider"] for row in data["rows"]}, stem
        assert all(row["speedup_vs_ref"] == 1.0 for row in data["rows"] if row["provider"] == "timm")
    step = json.loads(result(results, "train_step_tiny_nchw", ".json").read_text())
    assert step["meta"]["reference"].startswith("timm")


@pytest.mark.parametrize("option", ["--steps", "--warmup"])
def test_train_step_rejects_zero_steps(tmp_path, monkeypatch, capsys, option):
    """0 used to fall back silently to the default, as if the option had not been given."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit) as exc:
        train_step.main(["--quick", option, "0"])
    assert exc.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_train_step_takes_any_nf_family_by_name(tmp_path, monkeypatch, capsys):
    """--model: any timm NormFreeNet name nfkernels builds, with timm's model as the reference on
    the GPU (here nfkernels' own model on its torch path); the same weights give the same loss."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rows = train_step.main(["--quick", "--model", "nf_ecaresnet26", "--batch", "2", "--steps", "1", "--warmup", "1"])
    losses = {row["provider"]: row["loss_step0"] for row in rows}
    assert losses["nfkernels"] == pytest.approx(losses["reference"], rel=1e-5)
    data = json.loads(result(tmp_path, "train_step_nf_ecaresnet26_nchw", ".json").read_text())
    assert data["meta"]["variant"] == "nf_ecaresnet26" and "nf_ecaresnet26" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_step.main(["--quick", "--model", "nf_ecaresnet26", "--variant", "f0"])
