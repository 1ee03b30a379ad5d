"""torch.library.opcheck on frozenopt::sgd_ and frozenopt::adam_.

Three kinds of arguments:
- "cpu": real CPU tensors, so the CPU kernels run under opcheck's checks
  (the schema's mutation annotations against what the kernel writes, the
  fake kernel against the real one, AOT dispatch);
- "cuda-fake": FakeTensors on a CUDA device, which need no GPU: the checks
  then run the fake kernels (the ones torch.compile traces with) on CUDA
  tensors, and functionalize the ops with CUDA arguments for AOT dispatch.
  No CUDA kernel runs, so the schema and fake-versus-real checks compare the
  fake kernel with itself here: this cannot show what the CUDA kernels write;
- "cuda": real CUDA tensors (needs a GPU; skipped without one).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from frozenopt import ops

ops.require_extension()
HAS_GPU = torch.cuda.is_available() and ops.require_extension().cuda_plan.built_with_cuda
KINDS = ["cpu", "cuda-fake", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a GPU"))]
SIZES = [5, 0, 70000, 3]


def _tensors(kind, build):
    """build(device) -> args, made as real tensors or as CUDA FakeTensors."""
    if kind == "cuda-fake":
        with FakeTensorMode():
            return build("cuda")
    return build(kind)


# Tensors are made on their device directly: a CPU-only torch cannot move a
# FakeTensor to CUDA, but it can make one there.

def _sgd_args(device, momentum):
    params = [torch.randn(n, device=device) for n in SIZES]
    grads = [torch.randn(n, device=device) for n in SIZES]
    bufs = [torch.zeros(n, device=device) for n in SIZES] if momentum else []
    mask = torch.tensor([0, 0, 1, 0], dtype=torch.bool, device=device)
    kwargs = dict(lr=0.0, lr_tensor=torch.tensor(0.1, device=device), momentum=momentum, dampening=0.0,
                  weight_decay=0.01, nesterov=False, maximize=False, is_first_step=False,
                  grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device))
    return (params, grads, bufs, mask), kwargs


def _adam_args(device, amsgrad):
    params = [torch.randn(n, device=device) for n in SIZES]
    grads = [torch.randn(n, device=device) for n in SIZES]
    states = [[torch.zeros(n, device=device) for n in SIZES] for _ in range(3 if amsgrad else 2)]
    steps = [torch.zeros((), device=device) for _ in SIZES]
    mask = torch.tensor([1, 0, 0, 0], dtype=torch.uint8, device=device)
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                  decoupled_weight_decay=True, grad_scale=None, found_inf=torch.tensor(0.0, device=device))
    return (params, grads, states[0], states[1], states[2] if amsgrad else [], steps, mask), kwargs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_sgd(kind, momentum):
    args, kwargs = _tensors(kind, lambda device: _sgd_args(device, momentum))
    if kind == "cuda-fake":
        assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in args[0])
    torch.library.opcheck(torch.ops.frozenopt.sgd_.default, args, kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam(kind, amsgrad):
    args, kwargs = _tensors(kind, lambda device: _adam_args(device, amsgrad))
    torch.library.opcheck(torch.ops.frozenopt.adam_.default, args, kwargs)

