"""PyTorch's own optimizer test inputs, run against frozenopt.

``torch.testing._internal.common_optimizers`` lists, for every torch.optim
optimizer, the keyword sets its tests construct it with and the inputs that
must fail. Each keyword set here builds frozenopt's optimizer and torch's on
the same params (float32 and complex64), steps both, and compares; each error
input must raise what torch raises, except where frozenopt deliberately
differs (the table below says how and why).
"""

import copy
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import frozenopt

INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in ("SGD", "Adam", "AdamW")}

# torch's description of an error input (verbatim) -> what frozenopt does instead, and why.
DIFFERS = {
    # A param listed twice would be stepped twice per step; torch only warns.
    "a param group cannot have duplicate parameters": (ValueError, "the same parameter more than once"),
    # foreach is accepted for compatibility and ignored: frozenopt's own kernels read a tensor lr or
    # tensor betas whatever foreach says, so there is nothing to refuse.
    "lr as Tensor doesn't work with foreach & not capturable": None,
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True": None,
}


def _inputs():
    for name, info in INFOS.items():
        for dtype in (torch.float32, torch.complex64):
            for i, case in enumerate(info.optim_inputs_func(device="cpu", dtype=dtype)):
                yield pytest.param(name, dtype, i, id=f"{name}-{dtype}-{case.desc}")


def _error_inputs():
    for name, info in INFOS.items():
        for i, case in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(name, i, id=f"{name}-{case.optimizer_error_input.desc}")


@pytest.mark.parametrize("name,dtype,index", list(_inputs()))
def test_torch_optimizer_inputs_step_like_torch(name, dtype, index):
    case = INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)[index]
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in ((10, 5), (5,), (3, 4, 2), ())]
    theirs = copy.deepcopy(ours)
    opt = getattr(frozenopt, name)(ours, **copy.deepcopy(case.kwargs))
    ref = getattr(torch.optim, name)(theirs, **copy.deepcopy(case.kwargs))
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q)
            for key, value in ref.state[q].items():
                if value is not None:
                    torch.testing.assert_close(opt.state[p][key].to(value.dtype), value)


@pytest.mark.parametrize("name,index", list(_error_inputs()))
def test_torch_error_inputs_raise_as_in_torch(name, index):
    case = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    given = case.optimizer_error_input
    expected = DIFFERS.get(given.desc, (case.error_type, case.error_regex))
    if expected is None:  # accepted, and it steps
        params = given.params if given.params is not None else [torch.nn.Parameter(torch.randn(3))]
        opt = getattr(frozenopt, name)(params, **given.kwargs)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
        return
    error_type, regex = expected
    with warnings.catch_warnings():
        warnings.simplefilter("error" if issubclass(error_type, Warning) else "ignore")
        with pytest.raises(error_type, match=regex):
            opt = getattr(frozenopt, name)(given.params, **given.kwargs)
            if case.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()
