"""torch.library.opcheck on frozenopt::sgd_ and frozenopt::adam_, for every
sample: the schema (its alias and mutation annotations against what the kernel
writes), the fake kernel against the real one, and AOT dispatch.

Each sample is an optimizer configuration of the matrix (tests/matrix.py) as
the op's arguments, over params of every dtype at once, with or without
grad_scale/found_inf and a frozen mask (bool or uint8), on three kinds of
tensors:
- "cpu": real CPU tensors, so the CPU kernels run under opcheck;
- "cuda-fake": FakeTensors on a CUDA device, which need no GPU: the fake
  kernels (the ones torch.compile traces with) run on CUDA tensors and the ops
  are functionalized with CUDA arguments. No CUDA kernel runs, so this cannot
  show what the CUDA kernels write;
- "cuda": real CUDA tensors (the CUDA column: skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from matrix import DTYPES, config, requires_cuda
from torch._subclasses.fake_tensor import FakeTensorMode

KINDS = ["cpu", "cuda-fake", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
SIZES = [5, 0, 70000, 3]  # an empty tensor, and one of more than a CUDA chunk (65536)

# (config id, with grad_scale/found_inf, mask: None or the frozen entries' dtype)
SAMPLES = [
    ("sgd", False, None),
    ("sgd", True, torch.bool),
    ("sgd_momentum", False, torch.uint8),
    ("sgd_momentum", True, None),
    ("adam", False, torch.bool),
    ("adam", True, None),
    ("adamw_weight_decay", False, None),
    ("adamw_weight_decay", True, torch.uint8),
    ("adam_amsgrad", True, torch.bool),
    ("adamw_amsgrad", False, torch.uint8),
]
IDS = [f"{c}-{'scaled' if s else 'unscaled'}-{str(m).split('.')[-1] if m else 'nomask'}" for c, s, m in SAMPLES]


def op_sample(cfg, device, scaled, mask_dtype):
    """The op and its (args, kwargs) for one configuration: every param dtype in
    one call (the op groups tensors by dtype), state zeros as on a first step."""
    kw = cfg.kwargs
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(SIZES))]
    params = [torch.randn(n, device=device).to(d) for n, d in zip(SIZES, dtypes)]
    grads = [torch.randn(n, device=device).to(d) for n, d in zip(SIZES, dtypes)]

    def zeros():
        return [torch.zeros_like(p) for p in params]

    mask = None if mask_dtype is None else torch.tensor([0, 0, 1, 0], dtype=mask_dtype, device=device)
    scale = dict(grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device)) \
        if scaled else dict(grad_scale=None, found_inf=None)
    # A tensor lr on scaled samples, a float lr otherwise.
    lr = dict(lr=0.0, lr_tensor=torch.tensor(kw["lr"], device=device)) if scaled else dict(lr=kw["lr"], lr_tensor=None)
    if cfg.name == "SGD":
        momentum = kw.get("momentum", 0.0)
        args = (params, grads, zeros() if momentum else [], mask)
        kwargs = dict(momentum=momentum, dampening=kw.get("dampening", 0.0),
                      weight_decay=kw.get("weight_decay", 0.0), nesterov=kw.get("nesterov", False),
                      maximize=kw.get("maximize", False), is_first_step=not scaled)
        return torch.ops.frozenopt.sgd_.default, args, {**lr, **kwargs, **scale}
    amsgrad = kw.get("amsgrad", False)
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    steps = [torch.zeros((), device=device) for _ in params]
    args = (params, grads, zeros(), zeros(), zeros() if amsgrad else [], steps, mask)
    kwargs = dict(beta1=beta1, beta2=beta2, eps=kw.get("eps", 1e-8),
                  weight_decay=kw.get("weight_decay", 0.01 if cfg.name == "AdamW" else 0.0), amsgrad=amsgrad,
                  maximize=kw.get("maximize", False), decoupled_weight_decay=cfg.name == "AdamW")
    return torch.ops.frozenopt.adam_.default, args, {**lr, **kwargs, **scale}


# Tensors are made on their device directly: a CPU-only torch cannot move a
# FakeTensor to CUDA, but it can make one there.
def sample_on(kind, cfg, scaled, mask_dtype):
    if kind == "cuda-fake":
        with FakeTensorMode():
            op, args, kwargs = op_sample(cfg, "cuda", scaled, mask_dtype)
        assert all(t.is_cuda for t in args[0]), "the fake sample is not on a CUDA device"
        return op, args, kwargs
    return op_sample(cfg, kind, scaled, mask_dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_opcheck(sample, kind):
    config_id, scaled, mask_dtype = sample
    op, args, kwargs = sample_on(kind, config(config_id), scaled, mask_dtype)
    torch.library.opcheck(op, args, kwargs)

