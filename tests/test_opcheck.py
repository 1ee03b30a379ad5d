"""torch.library.opcheck on frozenopt::sgd_ and frozenopt::adam_ (and their *_groups_ forms), for every
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



# The *_groups_ ops: the same configurations as two groups (the second with other
# values), each param naming its group's row of the table.
GROUPS_SAMPLES = [("sgd_momentum", True, torch.uint8), ("sgd", False, None), ("adam_amsgrad", False, torch.bool),
                  ("adamw_weight_decay", True, None)]


def groups_sample(cfg, device, scaled, mask_dtype):
    op, args, kwargs = op_sample(cfg, device, scaled, mask_dtype)
    lr = kwargs["lr_tensor"].item() if kwargs["lr_tensor"] is not None and device != "cuda" else cfg.kwargs["lr"]
    scale = dict(grad_scale=kwargs["grad_scale"], found_inf=kwargs["found_inf"])
    if cfg.name == "SGD":
        row = [lr, kwargs["momentum"], kwargs["dampening"], kwargs["weight_decay"], float(kwargs["nesterov"]),
               float(kwargs["maximize"])]
        other = [lr / 2, kwargs["momentum"] / 2, 0.0, 0.1, 0.0, 1.0]
        groups_op, flags = torch.ops.frozenopt.sgd_groups_.default, dict(
            momentum=kwargs["momentum"] != 0, is_first_step=kwargs["is_first_step"])
    else:
        row = [lr, kwargs["beta1"], kwargs["beta2"], kwargs["weight_decay"], kwargs["eps"],
               float(kwargs["amsgrad"]), float(kwargs["maximize"]), float(kwargs["decoupled_weight_decay"])]
        other = [lr / 2, 0.5, 0.9, 0.2, 1e-3, float(kwargs["amsgrad"]), 1.0, 0.0]
        groups_op, flags = torch.ops.frozenopt.adam_groups_.default, dict(amsgrad=kwargs["amsgrad"])
    table = torch.tensor([row, other], dtype=torch.float64, device=device)
    tensor_group = torch.tensor([i % 2 for i in range(len(SIZES))], dtype=torch.int32, device=device)
    return groups_op, (*args, table, tensor_group), {**flags, **scale}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample", GROUPS_SAMPLES, ids=[s[0] for s in GROUPS_SAMPLES])
def test_opcheck_groups(sample, kind):
    config_id, scaled, mask_dtype = sample
    if kind == "cuda-fake":
        with FakeTensorMode():
            op, args, kwargs = groups_sample(config(config_id), "cuda", scaled, mask_dtype)
    else:
        op, args, kwargs = groups_sample(config(config_id), kind, scaled, mask_dtype)
    torch.library.opcheck(op, args, kwargs)
