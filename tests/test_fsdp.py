"""FSDP2 (``fully_shard``) on the CPU, 2 processes with gloo: the optimizer steps the local shards.

Params are DTensors; frozenopt's ops get each param's local shard (and its grad's and
state's), freeze/unfreeze take the model's own names, and the result matches one process
training the unsharded model on the global batch. A ``torch.distributed.checkpoint``
round trip keeps the state of params that were trained and later frozen.
"""

import pytest
import torch
import torch.distributed as dist
from dist_helpers import needs_gloo, run_distributed
from torch import nn

import frozenopt

pytestmark = pytest.mark.skipif(not needs_gloo[0], reason=needs_gloo[1])

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

STEPS = 24
SCHEDULE = {6: ("freeze", ("0",)), 12: ("freeze", ("2.weight",)), 16: ("unfreeze", ("0",))}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def shard(model):
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def train(model, opt, steps, rank, world, *, reference=False, schedule=SCHEDULE, start=0):
    for step in range(start, start + steps):
        if step in schedule:
            what, targets = schedule[step]
            getattr(opt, what)(*targets)
        if reference:
            xs, ys = zip(*(batch(step, r) for r in range(world)))
            x, y = torch.cat(xs), torch.cat(ys)
        else:
            x, y = batch(step, rank)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if opt.is_frozen(n)}
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p.detach(), frozen[n]), f"frozen {n} moved at step {step}"


def full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}


def fsdp_worker(rank, world, ckpt_dir):
    for mask_only in (False, True):  # both modes in one pair of processes: spawning is the slow part
        check_fsdp(rank, world, f"{ckpt_dir}-{mask_only}", mask_only)


def check_fsdp(rank, world, ckpt_dir, mask_only):
    from torch.distributed.tensor import DTensor

    model = shard(make_model())
    opt = frozenopt.AdamW(model, lr=1e-2, weight_decay=0.05, mask_only=mask_only)
    assert isinstance(model[0].weight, DTensor)
    assert opt.param_groups[0]["param_names"][:2] == ["0.weight", "0.bias"]
    ref_model = make_model()
    ref = frozenopt.AdamW(ref_model, lr=1e-2, weight_decay=0.05, mask_only=mask_only)
    train(model, opt, STEPS, rank, world)
    train(ref_model, ref, STEPS, rank, world, reference=True)

    state = opt.state[model[2].weight]
    assert isinstance(state["exp_avg"], DTensor)  # sharded like its param, as torch.optim's is
    assert state["exp_avg"].to_local().shape == model[2].weight.to_local().shape
    assert float(state["step"]) == 12.0  # trained 12 steps, then frozen: its counter stopped
    assert opt.frozen == ref.frozen == ["2.weight"]
    for (n, p), q in zip(full(model).items(), full(ref_model).values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")

    # torch.distributed.checkpoint: sharded save and load, with a trained-then-frozen param
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from frozenopt.distributed import load_checkpoint, save_checkpoint

    assert "2.weight" in get_optimizer_state_dict(model, opt)["state"]
    save_checkpoint(model, opt, ckpt_dir)
    model2 = shard(make_model())
    opt2 = frozenopt.AdamW(model2, lr=1e-2, weight_decay=0.05, mask_only=mask_only)
    opt2.freeze("2.weight", "4")  # frozen before any step: no state, requires_grad off by default
    load_checkpoint(model2, opt2, ckpt_dir)
    assert opt2.frozen == ["2.weight"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        a, b = opt.state[model[2].weight][key], opt2.state[model2[2].weight][key]
        assert torch.equal(a.to_local() if isinstance(a, DTensor) else a,
                           b.to_local() if isinstance(b, DTensor) else b), key
    # both continue the same way, bitwise, and the frozen param resumes its own state
    more = {STEPS + 2: ("unfreeze", ("2.weight",))}
    train(model, opt, 5, rank, world, schedule=more, start=STEPS)
    train(model2, opt2, 5, rank, world, schedule=more, start=STEPS)
    for n, p in model.named_parameters():
        assert torch.equal(p.to_local(), dict(model2.named_parameters())[n].to_local()), n
    assert float(opt2.state[model2[2].weight]["step"]) == 15.0


@pytest.mark.skipif(fully_shard is None, reason="this torch has no torch.distributed.fsdp.fully_shard")
def test_fsdp2_steps_local_shards_and_checkpoints(tmp_path):
    """Default mode (requires_grad flips, which FSDP2 follows) and mask_only, one after the other."""
    run_distributed(fsdp_worker, str(tmp_path / "ckpt"), timeout=150)


def comm_worker(rank, world):
    """What FSDP2 communicates for frozen params, counted by wrapping its two collectives."""
    real_rs, real_ag = dist.reduce_scatter_single, dist.all_gather_single
    sent = {"reduce_scatter": 0, "all_gather": 0}

    def reduce_scatter(output, input, **kwargs):
        sent["reduce_scatter"] += 1
        return real_rs(output=output, input=input, **kwargs)

    def all_gather(output, input, *args, **kwargs):
        sent["all_gather"] += 1
        return real_ag(output, input, *args, **kwargs)

    dist.reduce_scatter_single, dist.all_gather_single = reduce_scatter, all_gather
    per_mode = {}
    try:
        for mask_only in (False, True):
            model = shard(make_model())
            opt = frozenopt.AdamW(model, lr=1e-2, mask_only=mask_only)
            opt.freeze("0", "2")  # after fully_shard; layer 4 trains
            for step in range(2):
                sent.update(reduce_scatter=0, all_gather=0)
                x, y = batch(step, rank)
                nn.functional.mse_loss(model(x), y).backward()
                with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
                opt.step()
                opt.zero_grad()
            per_mode[mask_only] = (dict(sent), with_grad)
    finally:
        dist.reduce_scatter_single, dist.all_gather_single = real_rs, real_ag
    # default mode: FSDP2 copies requires_grad to the unsharded param at each all-gather, so the
    # frozen layers get no grad and their groups no reduce-scatter; they are still all-gathered
    # for the forward (and layer 2 again in backward: FSDP2 prefetches the module that ran
    # before layer 4, whose backward then does not run)
    assert per_mode[False] == ({"reduce_scatter": 1, "all_gather": 5}, ["4.weight", "4.bias"])
    # mask_only: every param has a grad, every group is reduce-scattered, layer 0 gathered again
    assert per_mode[True] == ({"reduce_scatter": 3, "all_gather": 6}, [n for n, _ in model.named_parameters()])


@pytest.mark.skipif(fully_shard is None, reason="this torch has no torch.distributed.fsdp.fully_shard")
def test_fsdp2_does_not_reduce_frozen_grads_in_default_mode():
    run_distributed(comm_worker, timeout=120)


class Tokens(nn.Module):
    """An embedding of 13 rows (uneven over 2 ranks: 7 and 6) of 64, and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(13, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def token_batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 13, (6, 5), generator=g), torch.randn(6, 4, generator=g)


def rows_worker(rank, world):
    """Each rank applies its own rows of the mask to its shard (Shard(0)); the result equals
    one process training the unsharded model with the same row freezes on the global batch."""
    for mask_only in (False, True):
        model = Tokens()
        fully_shard(model.emb)
        fully_shard(model)
        ref_model = Tokens()
        old = ref_model.emb.weight.detach().clone()
        opt = frozenopt.AdamW(model, lr=1e-2, weight_decay=0.05, mask_only=mask_only)
        ref = frozenopt.AdamW(ref_model, lr=1e-2, weight_decay=0.05, mask_only=mask_only)
        for o in (opt, ref):
            o.freeze("emb.weight", rows=[0, 1, 2, 5, 6, 7, 8, 11])  # frozen rows on both ranks' shards
        for step in range(8):
            if step == 4:
                for o in (opt, ref):
                    o.unfreeze("emb.weight", rows=[6, 7])  # the first rank's last row, the second's first
            x, y = token_batch(step, rank)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            xs, ys = zip(*(token_batch(step, r) for r in range(world)))
            nn.functional.mse_loss(ref_model(torch.cat(xs)), torch.cat(ys)).backward()
            ref.step()
            ref.zero_grad()
        assert opt.frozen == ref.frozen == ["emb.weight [6 of 13 rows frozen]"]
        weight = model.emb.weight.full_tensor().detach()
        assert torch.equal(weight[[0, 1, 2, 5, 8, 11]], old[[0, 1, 2, 5, 8, 11]]), "a frozen row moved"
        for (n, p), q in zip(full(model).items(), full(ref_model).values()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
        rows = opt.state[model.emb.weight]["state_rows"].tolist()  # local rows with state
        # rank 0 holds global rows 0-6 (3, 4 train, 6 from step 4), rank 1 rows 7-12 (7 from step 4;
        # 9, 10 and 12 train): frozen rows never got state
        assert rows == ([3, 4, 6] if rank == 0 else [0, 2, 3, 5])


@pytest.mark.skipif(fully_shard is None, reason="this torch has no torch.distributed.fsdp.fully_shard")
def test_fsdp2_row_freeze_steps_each_ranks_rows():
    run_distributed(rows_worker, timeout=150)
