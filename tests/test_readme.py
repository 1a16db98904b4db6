"""The README's usage example runs as written (with a smaller image)."""
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    code = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("torch.randn(2, 3, 192, 192)", "torch.randn(1, 3, 32, 32)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. convert warns when an example converts nothing
        exec(compile(code, str(README), "exec"), {})
