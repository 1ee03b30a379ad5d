"""torch.compile: a compiled optimizer step, freeze/unfreeze toggles, recompile counts.

Counts come from dynamo's CompileCounterWithBackend (one per graph compiled).
The step has one graph break, before its ops: the code that reads the param
groups (which params have a grad, their state, the groups' values) runs outside
the graph, and the graph holds the op calls. Measured (torch 2.13, CPU),
compiling ``opt.step``:
- mask_only=True: 1 graph (2 for SGD with momentum, whose first step takes a
  call of its own), then none, however often the mask flips;
- default mode (requires_grad flips): one more graph per number of params with
  a grad not seen before (the op's lists are that long); going back to a
  length already seen reuses its graph.
"""


import pytest
import torch
import torch._dynamo
from matrix import config
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import frozenopt

BACKEND = "aot_eager"  # AOTAutograd + functionalization, the inductor front end; fast to build


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def clone_model(model):
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    return twin


OPTIMIZERS = ["sgd_all", "adamw_weight_decay", "adam_amsgrad"]  # configurations of tests/matrix.py

# step -> ("freeze" | "unfreeze", targets)
TOGGLES = {2: ("freeze", ("0",)), 4: ("freeze", ("2.weight",)), 5: ("unfreeze", ("0",)),
           7: ("unfreeze", ()), 8: ("freeze", ("4", "0.bias"))}


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)) for _ in range(n)]


def run(model, opt, data, step_fn, on_step=None):
    for i, (x, y) in enumerate(data):
        if i in TOGGLES:
            what, targets = TOGGLES[i]
            getattr(opt, what)(*targets)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        step_fn()
        opt.zero_grad()
        if on_step is not None:
            on_step(i)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_mask_only_toggles_never_recompile_and_match_eager(kind):
    model = make_model()
    twin = clone_model(model)
    opt = config(kind).make(model, mask_only=True)
    ref = config(kind).make(twin, mask_only=True)
    counter = CompileCounterWithBackend(BACKEND)

    @torch.compile(backend=counter)
    def compiled_step():
        opt.step()

    frames = []
    frozen_snapshots = {}

    def check(i):
        frames.append(counter.frame_count)
        for name, p in model.named_parameters():
            if opt.is_frozen(name):
                frozen_snapshots.setdefault((name, i), p.detach().clone())

    data = batches(11)
    run(model, opt, data, compiled_step, check)
    run(twin, ref, data, ref.step)

    assert frames[1] == (2 if kind == "sgd_all" else 1), frames  # SGD's first momentum step: a graph of its own
    assert frames[-1] == frames[1], f"a freeze/unfreeze toggle recompiled: frames per step {frames}"
    for (p, q) in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), "compiled and eager steps differ"
    assert opt.frozen == ref.frozen == ["0.bias", "4.weight", "4.bias"]
    for name in ("0.bias", "4.weight", "4.bias"):
        # frozen at step 8: the values after steps 8, 9 and 10 are those from before step 8
        before = frozen_snapshots[(name, 8)]
        assert torch.equal(dict(model.named_parameters())[name].detach(), before)


def test_compiled_frozen_param_is_bitwise_unchanged_with_state():
    model = make_model()
    opt = frozenopt.AdamW(model, lr=1e-2, mask_only=True)
    counter = CompileCounterWithBackend(BACKEND)
    step = torch.compile(opt.step, backend=counter)
    data = batches(6)
    for i, (x, y) in enumerate(data):
        if i == 2:
            opt.freeze("2")
            w = model[2].weight.detach().clone()
            state = {k: v.clone() for k, v in opt.state[model[2].weight].items()}
        nn.functional.mse_loss(model(x), y).backward()
        step()
        opt.zero_grad()
    assert model[2].weight.grad is None  # zero_grad; grads existed (mask_only) during the steps
    assert torch.equal(model[2].weight.detach(), w)
    for k, v in opt.state[model[2].weight].items():
        assert torch.equal(v, state[k]), k
    assert float(opt.state[model[2].weight]["step"]) == 2.0
    assert float(opt.state[model[0].weight]["step"]) == 6.0
    assert counter.frame_count == 1


def test_default_mode_recompiles_once_per_new_frozen_set():
    """requires_grad flips change how many params the op steps, and dynamo guards on that (measured)."""
    model = make_model()
    opt = frozenopt.AdamW(model, lr=1e-2)
    assert not opt.mask_only
    counter = CompileCounterWithBackend(BACKEND)
    step = torch.compile(opt.step, backend=counter)
    schedule = {2: ("freeze", "0"), 4: ("unfreeze", "0"), 6: ("freeze", "0"), 8: ("freeze", "2")}
    frames = []
    for i, (x, y) in enumerate(batches(10)):
        if i in schedule:
            getattr(opt, schedule[i][0])(schedule[i][1])
        nn.functional.mse_loss(model(x), y).backward()
        step()
        opt.zero_grad()
        frames.append(counter.frame_count)
    # 1: warm-up; 3: {0} frozen (new); 5: all unfrozen again (cached); 7: {0} (cached); 9: {0, 2} (new)
    assert frames == [1, 1, 2, 2, 2, 2, 2, 2, 3, 3], frames


def test_compiled_step_with_lr_scheduler_tensor_lr_no_recompile():
    """A 0-dim tensor lr changed by a scheduler is read at each step, not a constant of the graph."""
    model = make_model()
    opt = frozenopt.AdamW(model, lr=torch.tensor(0.01), mask_only=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    counter = CompileCounterWithBackend(BACKEND)

    # The scheduler wraps opt.step in a function dynamo skips (torch/optim/lr_scheduler.py),
    # so, as in PyTorch's compiled-optimizer-with-scheduler recipe, fullgraph is off here:
    # the wrapper runs eagerly and the optimizer's own step is compiled.
    @torch.compile(backend=counter)
    def step():
        opt.step()

    twin = clone_model(model)
    ref = torch.optim.AdamW(twin.parameters(), lr=torch.tensor(0.01))
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for x, y in batches(7):
        for m in (model, twin):
            nn.functional.mse_loss(m(x), y).backward()
        step()
        ref.step()
        sched.step()
        ref_sched.step()
        opt.zero_grad()
        ref.zero_grad()
    assert counter.frame_count == 1
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_inductor_mask_only_matches_eager():
    model = make_model()
    twin = clone_model(model)
    opt = frozenopt.AdamW(model, lr=1e-2, mask_only=True)
    ref = frozenopt.AdamW(twin, lr=1e-2, mask_only=True)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter)
    data = batches(9)
    run(model, opt, data, step)
    run(twin, ref, data, ref.step)
    assert counter.frame_count == 1
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
