"""What a newcomer meets first: the README's examples, the install path, the import.

Each ```python block of the README runs on its own, and prints exactly the
```text block that follows it (a block with no ```text block after it must
print nothing).
"""

import contextlib
import io
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozenopt

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```\n(?:[ \t]*\n)*(?:```text\n(.*?)```)?", README, flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3
    assert sum(1 for _, out in EXAMPLES if out) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_prints_what_the_readme_says(index):
    code, expected = EXAMPLES[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    assert out.getvalue() == expected


def test_quick_start_matches_torch_optim_sgd():
    """The SGD example's printed numbers are torch.optim.SGD's, not only what the README says."""
    block = next(code for code, _ in EXAMPLES if "TwoBranch" in code)
    torch_version = block.replace("opt = frozenopt.SGD(model, lr=1.0)",
                                  "opt = torch.optim.SGD(model.parameters(), lr=1.0)")
    torch_version = torch_version.replace('opt.freeze("fc2")', "model.fc2.requires_grad_(False)")
    torch_version = torch_version.replace("opt.unfreeze()", "model.fc2.requires_grad_(True)")
    assert torch_version.count("torch.optim.SGD") == 1 and "opt.freeze" not in torch_version
    printed = []
    for code in (block, torch_version):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md[TwoBranch]", "exec"), {"__name__": "__readme__"})
        printed.append(out.getvalue())
    assert printed[0] == printed[1]
    assert "1.9000, 1.8000, 2.3000, 2.4000" in printed[0]


# -- import frozenopt as optim ---------------------------------------------------------------

def test_every_torch_optim_name_is_reachable():
    for name in torch.optim.__all__:
        assert hasattr(frozenopt, name), name
        assert name in frozenopt.__all__, name
    for name in ("SGD", "Adam", "AdamW"):
        ours = getattr(frozenopt, name)
        assert ours is not getattr(torch.optim, name) and ours.__module__ == "frozenopt.optim"
        assert issubclass(ours, frozenopt.Optimizer)
    for name in ("Optimizer", "lr_scheduler", "swa_utils", "RMSprop", "LBFGS"):
        assert getattr(frozenopt, name) is getattr(torch.optim, name)


def test_schedulers_through_the_alias_drive_frozenopt():
    from frozenopt.lr_scheduler import StepLR
    from frozenopt.swa_utils import AveragedModel

    import frozenopt as optim

    model = torch.nn.Linear(3, 2)
    opt = optim.SGD(model, lr=0.1)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    opt.freeze("bias")
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert AveragedModel(model).module is not model


# -- building and importing ------------------------------------------------------------------

def test_missing_extension_is_a_clear_error(monkeypatch):
    from frozenopt import ops

    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", ImportError("no module named frozenopt._C"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        frozenopt.AdamW([torch.nn.Parameter(torch.ones(2))])


def test_the_build_records_the_torch_it_was_built_against():
    from frozenopt._build_info import TORCH_VERSION

    assert TORCH_VERSION == torch.__version__


def test_extension_built_against_another_torch_fails_at_import(tmp_path):
    """A copy of the built package whose record names another torch: `import frozenopt` fails, naming both."""
    shutil.copytree(Path(frozenopt.__file__).parent, tmp_path / "frozenopt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "frozenopt" / "_build_info.py").write_text("TORCH_VERSION = '2.4.0+cu121'\n")
    run = subprocess.run([sys.executable, "-c", "import frozenopt"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    assert "ImportError" in run.stderr
    assert f"built against torch 2.4.0+cu121, but torch {torch.__version__} is loaded" in run.stderr
    assert "pip install --no-build-isolation" in run.stderr


def test_build_without_torch_stops_with_the_install_command(monkeypatch):
    """What an isolated build (no torch in its environment) gets from setup.py: the README's commands."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "setup.py"))
    message = str(stop.value)
    assert "\n" not in message and "no torch" in message
    install = re.search(r"## Install\n(.*?)\n## ", README, flags=re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", install, flags=re.S).group(1).strip().splitlines()
    assert commands == ['pip install "setuptools>=77" wheel pybind11 ninja', "pip install --no-build-isolation ."]
    assert " && ".join(commands) in message


def test_torch_is_not_a_build_requirement():
    """An isolated build must not fetch a torch of its own to compile against."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = config["build-system"]["requires"]
    assert not any(re.match(r"torch\b", r) for r in requires), requires
    assert {"pybind11", "ninja"} <= set(requires)
    assert not any(re.match(r"(pybind11|ninja)\b", r) for r in config["project"]["dependencies"])
