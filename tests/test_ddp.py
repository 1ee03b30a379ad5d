"""DistributedDataParallel, 2 CPU processes with gloo: freezing after wrapping keeps ranks in sync."""

import warnings

import pytest
import torch
import torch.distributed as dist
from dist_helpers import needs_gloo, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import frozenopt

pytestmark = pytest.mark.skipif(not needs_gloo[0], reason=needs_gloo[1])

STEPS = 60
SCHEDULE = {10: ("freeze", ("0",)), 20: ("freeze", ("2.weight",)), 30: ("unfreeze", ("0",)),
            40: ("unfreeze", ()), 45: ("freeze", ("4",))}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_ranks_in_sync(model, world, step):
    mine = flat(model)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(gathered[0], t) for t in gathered), f"ranks out of sync at step {step}"


def ddp_worker(rank, world):
    model = make_model()
    ddp = DDP(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = frozenopt.AdamW(ddp, lr=1e-2, weight_decay=0.05)
        other = frozenopt.SGD(ddp, lr=0.1)
    notices = [w for w in caught if "DistributedDataParallel" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]  # said once
    assert opt.mask_only and other.mask_only
    assert not frozenopt.SGD(ddp, lr=0.1, mask_only=False).mask_only  # an explicit choice wins
    assert opt.param_groups[0]["param_names"][0] == "0.weight"  # the model's names, no "module." prefix

    # the reference: one process, the global batch, the same freeze schedule
    ref_model = make_model()
    ref = frozenopt.AdamW(ref_model, lr=1e-2, weight_decay=0.05)

    for step in range(STEPS):
        if step in SCHEDULE:
            what, targets = SCHEDULE[step]
            getattr(opt, what)(*targets)
            getattr(ref, what)(*targets)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if opt.is_frozen(n)}
        x, y = batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"frozen {n} moved at step {step}"
            assert p.requires_grad, "mask_only must leave requires_grad alone"
        assert_ranks_in_sync(model, world, step)

        xs, ys = zip(*(batch(step, r) for r in range(world)))
        nn.functional.mse_loss(ref_model(torch.cat(xs)), torch.cat(ys)).backward()
        ref.step()
        ref.zero_grad()
    assert opt.frozen == ref.frozen == ["4.weight", "4.bias"]
    # DDP averages the ranks' grads: the same as one process on the global batch, to rounding
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-4, atol=1e-5)

    # Why mask_only is the default here: flipping requires_grad after wrapping leaves DDP's
    # reducer waiting for grads that never come; the next forward raises.
    model2 = make_model()
    ddp2 = DDP(model2)
    opt2 = frozenopt.SGD(ddp2, lr=0.1, mask_only=False)
    opt2.freeze("0")
    with pytest.raises(RuntimeError, match="finished reduction in the prior iteration"):
        for step in range(2):
            x, y = batch(step, rank)
            nn.functional.mse_loss(ddp2(x), y).backward()
            opt2.step()
            opt2.zero_grad()


def test_ddp_freeze_after_wrapping_stays_in_sync():
    run_distributed(ddp_worker, timeout=150)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def token_batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 40, (6, 5), generator=g), torch.randn(6, 4, generator=g)


def ddp_rows_worker(rank, world):
    from frozenopt.distributed import register_unfrozen_allreduce

    model = Tokens()
    ddp = DDP(model)
    opt = frozenopt.AdamW(ddp, lr=1e-2, weight_decay=0.05, mask_only=True)
    register_unfrozen_allreduce(ddp, opt)
    ref_model = Tokens()
    ref = frozenopt.AdamW(ref_model, lr=1e-2, weight_decay=0.05, mask_only=True)
    for o in (opt, ref):
        o.freeze("emb.weight", rows=slice(0, 30))
    old = model.emb.weight.detach()[:30].clone()
    for step in range(12):
        if step == 6:
            for o in (opt, ref):
                o.unfreeze("emb.weight", rows=[3, 7])
        x, y = token_batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert_ranks_in_sync(model, world, step)
        xs, ys = zip(*(token_batch(step, r) for r in range(world)))
        nn.functional.mse_loss(ref_model(torch.cat(xs)), torch.cat(ys)).backward()
        ref.step()
        ref.zero_grad()
    still = [r for r in range(30) if r not in (3, 7)]
    assert torch.equal(model.emb.weight.detach()[still], old[still])
    assert not torch.equal(model.emb.weight.detach()[[3, 7]], old[[3, 7]])
    assert opt.state[model.emb.weight]["state_rows"].tolist() == [3, 7, *range(30, 40)]
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-4, atol=1e-5)


def test_ddp_row_freeze_stays_in_sync():
    run_distributed(ddp_rows_worker, timeout=150)
