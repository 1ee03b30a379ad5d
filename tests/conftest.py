"""pytest wiring for the test matrix (tests/matrix.py): the ``cuda`` marker, and a
``device`` argument that runs a test once per device, the CUDA column skipping
itself (with the reason) where there is no GPU."""

from __future__ import annotations

import sys
from pathlib import Path

# The in-tree package, also when the tests are run without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrix import DEVICES  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (skipped, saying why, where there is none)")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)
