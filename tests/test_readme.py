"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_missing_extension_is_a_clear_error(monkeypatch):
    import torch

    import frozenopt
    from frozenopt import ops

    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", ImportError("no module named frozenopt._C"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e"):
        frozenopt.AdamW([torch.nn.Parameter(torch.ones(2))])
