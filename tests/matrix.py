"""The test matrix: devices, dtypes, optimizer configurations, tolerances, the
snapshot that "nothing changed" is checked with, sample data and shared models,
defined once for every test file.

- ``DEVICES``: "cpu", and "cuda", which skips itself (saying why) where no GPU
  and CUDA build of frozenopt is present. A test that takes a ``device``
  argument is run on every device (tests/conftest.py); the CUDA column carries
  the ``cuda`` marker, so ``pytest -m cuda`` runs every GPU test.
- ``FLOATS``, ``HALF``, ``DTYPES``: the param dtypes frozenopt steps.
- ``CONFIGS``: every optimizer configuration the tests use, by id
  (``OptimConfig``: the class name and its hyper-parameters); ``SWEEP`` is the
  list parity tests run over, ``KERNEL_SWEEP`` the ids the kernel-level tests
  run over, ``BY_CLASS`` one feature-rich row per class; ``config(id)`` /
  ``config_params(...)`` pick rows.
- ``tolerance(dtype, against)``: one table of rtol/atol, by what is compared.
- ``snapshot(opt)`` / ``model_snapshot(model)`` and ``assert_same``: everything
  a refused call must leave bitwise alone.
- ``random_tensors``: sample data, the same values on every dtype and device;
  ``TwoBranch`` and ``BodyHead``: the small models more than one file uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import frozenopt
from frozenopt import ops

# ----------------------------------------------------------------- devices

def _cuda_missing() -> str | None:
    """Why the CUDA column cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if not ops.require_extension().cuda_plan.built_with_cuda:
        return "frozenopt was built without its CUDA kernels"
    return None


CUDA_MISSING = _cuda_missing()
requires_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=f"CUDA column: {CUDA_MISSING}")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

# ----------------------------------------------------------------- dtypes

FLOATS = (torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)
DTYPES = [*FLOATS, *HALF]

# ----------------------------------------------------------------- optimizer configurations


@dataclass(frozen=True)
class OptimConfig:
    """One optimizer configuration: ``name`` is the class (frozenopt.<name> and
    torch.optim.<name>), ``kwargs`` its hyper-parameters, lr included."""

    id: str
    name: str
    kwargs: dict[str, Any] = field(hash=False)

    def make(self, params, **extra) -> torch.optim.Optimizer:
        """The frozenopt optimizer over ``params`` (``extra`` overrides or adds keywords)."""
        return getattr(frozenopt, self.name)(params, **{**self.kwargs, **extra})

    def reference(self, params, **extra) -> torch.optim.Optimizer:
        """torch.optim's optimizer of the same class and hyper-parameters."""
        return getattr(torch.optim, self.name)(params, **{**self.kwargs, **extra})

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


def _configs(*rows: tuple[str, str, dict[str, Any]]) -> dict[str, OptimConfig]:
    return {id_: OptimConfig(id_, name, kwargs) for id_, name, kwargs in rows}


CONFIGS = _configs(
    # Every branch of the update rules, one at a time or in the combinations that interact.
    ("sgd", "SGD", dict(lr=0.1)),
    ("sgd_momentum", "SGD", dict(lr=0.1, momentum=0.9)),
    ("sgd_dampening", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("sgd_nesterov", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd_weight_decay", "SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.05)),
    ("sgd_maximize", "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01, maximize=True)),
    ("adam", "Adam", dict(lr=0.01)),
    ("adam_l2", "Adam", dict(lr=0.01, weight_decay=0.1)),
    ("adam_amsgrad", "Adam", dict(lr=0.01, amsgrad=True)),
    ("adam_amsgrad_maximize", "Adam", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05)),
    ("adam_maximize_betas", "Adam", dict(lr=0.01, maximize=True, betas=(0.8, 0.99), eps=1e-6)),
    ("adamw", "AdamW", dict(lr=0.01)),
    ("adamw_weight_decay", "AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("adamw_amsgrad", "AdamW", dict(lr=0.01, weight_decay=0.3, amsgrad=True, betas=(0.8, 0.99), eps=1e-6)),
    ("adamw_maximize", "AdamW", dict(lr=0.01, maximize=True)),
    # Several features at once, for the tests about what happens around a step
    # (checkpoints, faults, compile, bad input, memory): one per class at least.
    ("sgd_all", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd_nesterov_decay", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam_all", "Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
)
SWEEP = [c for c in CONFIGS.values() if c.id not in ("sgd_all", "sgd_nesterov_decay", "adam_all")]
# Each branch of the update kernels once (the SWEEP's other rows differ from
# these only in hyper-parameter values): what the kernel-level tests run over.
KERNEL_SWEEP = ["sgd", "sgd_momentum", "sgd_dampening", "sgd_nesterov", "sgd_weight_decay", "sgd_maximize",
                "adam", "adam_l2", "adam_amsgrad_maximize", "adamw_weight_decay", "adamw_amsgrad"]
CLASSES = ["SGD", "Adam", "AdamW"]
# One configuration per class with most of its features on: for the tests of
# what surrounds a step (bad input, faults, checkpoints, drop-in edits).
BY_CLASS = {"SGD": CONFIGS["sgd_all"], "Adam": CONFIGS["adam_all"], "AdamW": CONFIGS["adamw_amsgrad"]}


def config(id_: str) -> OptimConfig:
    return CONFIGS[id_]


def config_params(ids: Iterable[str] | None = None) -> list[Any]:
    """pytest.param rows of the configurations named (default: the whole SWEEP)."""
    rows = SWEEP if ids is None else [CONFIGS[i] for i in ids]
    return [c.param() for c in rows]


# ----------------------------------------------------------------- tolerances

# (rtol, atol) by what is compared, then by the param dtype.
_TOLERANCES = {
    # frozenopt against torch.optim: float32/float64 are torch.testing's
    # defaults; half-type params are compared with a float64 (or float32-twin)
    # run from the same start, allowing a few units in their last place.
    "torch": {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5),
              torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)},
    # frozenopt against torch's fused kernels in the same dtype: both do the
    # math in float and round params and state to a half type once per step.
    "fused": {torch.float64: (1e-7, 1e-9), torch.float32: (1e-5, 1e-6),
              torch.bfloat16: (4e-2, 1.6e-2), torch.float16: (1e-2, 2e-3)},
    # Two of frozenopt's kernels on the same update math (the CUDA kernels
    # against the CPU ops): only FMA contraction differs, by an ulp that a half
    # type carries into the next steps.
    "kernels": {torch.float64: (1e-7, 1e-9), torch.float32: (1e-5, 1e-6),
                torch.bfloat16: (4e-2, 4e-3), torch.float16: (1e-2, 1e-3)},
}


def tolerance(dtype: torch.dtype, against: str = "torch") -> dict[str, float]:
    """rtol and atol for torch.testing.assert_close: ``against`` is "torch", "fused" or "kernels"."""
    rtol, atol = _TOLERANCES[against][dtype]
    return dict(rtol=rtol, atol=atol)


# ----------------------------------------------------------------- snapshots


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a bad call must leave alone, cloned: params (values, strides,
    requires_grad, identity), grads, state, param groups, the frozen set."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        if opt.state.get(p):
            state[i] = {k: (v.detach().clone(), v.data_ptr()) if isinstance(v, Tensor) else copy.deepcopy(v)
                        for k, v in opt.state[p].items()}
    groups = []
    for g in opt.param_groups:
        groups.append({k: (v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                       for k, v in g.items() if k != "params"} | {"params": [id(p) for p in g["params"]]})
    return {
        "ids": [id(p) for p in params],
        "values": [p.detach().clone() for p in params],
        "strides": [p.stride() for p in params],
        "requires_grad": [p.requires_grad for p in params],
        "grads": [None if p.grad is None else (_plain(p.grad), str(p.grad.layout), id(p.grad)) for p in params],
        "state": state,
        "state_entries": sum(1 for p in opt.state if opt.state[p]),
        "groups": groups,
        "frozen": list(getattr(opt, "frozen", [])),
    }


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """A model's params (names, values, requires_grad) and grads, cloned: for calls with no optimizer to compare."""
    return {
        "names": [n for n, _ in model.named_parameters()],
        "values": [p.detach().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else _plain(p.grad) for p in model.parameters()],
    }


def _plain(t: Tensor) -> Tensor:
    """A dense copy to compare bitwise (sparse grads densified)."""
    t = t.detach()
    return (t.to_dense() if t.layout != torch.strided else t).clone()


def _diff(a: Any, b: Any, path: str = "") -> str | None:
    """Where two snapshot values differ (None when bitwise equal)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        same = (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return None if same else path or "tensor"
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and type(a) is type(b):
        if len(a) != len(b):
            return f"{path} (length {len(a)} -> {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path} (keys {sorted(map(str, a))} -> {sorted(map(str, b))})"
        for k in a:
            d = _diff(a[k], b[k], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return None  # NaN hyper-parameter stored on both sides
    return None if a == b else f"{path} ({a!r} -> {b!r})"


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Assert that two snapshots are bitwise equal, naming the first difference."""
    for key in before:
        d = _diff(before[key], after[key], key)
        assert d is None, f"changed: {d}"


# ----------------------------------------------------------------- sample data


def random_tensors(sizes: Iterable[int], dtype: torch.dtype, seed: int, device: str = "cpu") -> list[Tensor]:
    """1-d tensors of the given sizes, drawn in float64 from one seed, so every
    dtype and device starts from the same values (rounded to the dtype)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device) for n in sizes]


# ----------------------------------------------------------------- models


class Reshape(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, 4)


class TwoBranch(nn.Module):
    """The BigDL-style two-input model: fc1(input2) + fc2(reshape(input1)), with a
    ReLU and a Threshold(10) output. ``filled()`` sets fc1's weights and bias to 1
    and fc2's to 2: from there ``KNOWN_INPUTS`` give ReLU outputs of 2.8, and one
    SGD step with lr=1 and output grads (1, 2), (3, 4) takes fc2.weight to
    ``FC2_AFTER_ONE_STEP``."""

    KNOWN_INPUTS = ((0.1, 0.2, -0.3, -0.4), ((0.5, 0.4, -0.2, -0.1),))
    FC2_AFTER_ONE_STEP = ((1.9, 1.8, 2.3, 2.4), (1.8, 1.6, 2.6, 2.8))

    def __init__(self) -> None:
        super().__init__()
        self.reshape = Reshape()
        self.fc1 = nn.Linear(4, 2)
        self.fc2 = nn.Linear(4, 2)
        self.relu = nn.ReLU()
        self.threshold = nn.Threshold(10.0, 0.0)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        s = self.fc1(x2) + self.fc2(self.reshape(x1))
        return self.relu(s), self.threshold(s)

    def filled(self) -> TwoBranch:
        with torch.no_grad():
            self.fc1.weight.fill_(1.0), self.fc1.bias.fill_(1.0)
            self.fc2.weight.fill_(2.0), self.fc2.bias.fill_(2.0)
        return self


class BodyHead(nn.Module):
    """Two linear layers, ``body`` then ``head``, from a fixed seed: the smallest
    model with a part to freeze and a part to train."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(inputs, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))
