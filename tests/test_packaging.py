"""How frozenopt is found: the installed package, even from a folder that holds a
directory named frozenopt (the folder a clone of this repository is usually in)."""

import os
import subprocess
import sys

import frozenopt


def test_import_from_the_folder_holding_a_clone(tmp_path):
    (tmp_path / "frozenopt").mkdir()  # a clone's folder: no __init__.py at its top
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import frozenopt; print(frozenopt.__file__, frozenopt.SGD.__name__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [frozenopt.__file__, "SGD"]
