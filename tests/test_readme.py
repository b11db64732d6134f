"""The README's runnable examples (code blocks marked <!-- test -->) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
EXAMPLES = re.findall(r"<!-- test -->\s*```python\n(.*?)```", README, flags=re.S)


def test_readme_has_runnable_examples():
    assert len(EXAMPLES) >= 1


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example(index):
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {})


def test_readme_gives_the_ci_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    command = "python -m pytest tests -q"
    assert f"```bash\n{command}\n```" in README and command in ci
