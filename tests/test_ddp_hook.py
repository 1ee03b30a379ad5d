"""The DDP communication hook that sends only unfrozen grads, 2 CPU processes with gloo.

Each model trains side by side with a plain DDP copy (same batches, same freeze schedule):
at every step the unfrozen grads equal plain DDP's bitwise, frozen grads are zero, params are
bitwise equal across ranks and to the plain copy's, and the bytes handed to all_reduce are
exactly the unfrozen params' plus the 16-byte frozen-set check (counted by wrapping
``torch.distributed.all_reduce``).
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from dist_helpers import needs_gloo, run_distributed
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import frozenopt
from frozenopt.distributed import UnfrozenAllreduceState, register_unfrozen_allreduce, unfrozen_allreduce_hook

pytestmark = pytest.mark.skipif(not needs_gloo[0], reason=needs_gloo[1])

LAYERS, WIDTH = 10, 16
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4
BUCKET_MB = 2.2 * LAYER_BYTES / 2**20  # about two layers per bucket once DDP rebuilds them
NINETY = tuple(str(i) for i in range(LAYERS - 1))  # 9 of 10 equal layers: 90% of the elements
# step: what the schedule does before that step's forward
SCHEDULE = {
    0: ("freeze", NINETY),
    4: ("unfreeze", ("*.bias",)),  # frozen weights between unfrozen biases: several runs per bucket
    7: ("freeze", ("*",)),  # every bucket all frozen: nothing is sent
    9: ("unfreeze", ()),  # nothing frozen: every bucket whole
    11: ("load", None),  # the checkpoint taken at step 3: its frozen set (90%) comes back
}
STEPS = 14
CHECK_BYTES = 16  # each step: the ranks' frozen sets compared (two int64)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, WIDTH, generator=g), torch.randn(5, WIDTH, generator=g)


class Sent:
    """Wraps torch.distributed.all_reduce to count the calls and bytes that go through it."""

    def __init__(self):
        self.calls, self.bytes, self._real = 0, 0, dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return self._real(tensor, *args, **kwargs)

    def take(self):
        taken = (self.calls, self.bytes)
        self.calls = self.bytes = 0
        return taken


def in_sync(tensor, world):
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], t) for t in gathered)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def apply(opt, what, targets, checkpoint):
    if what == "load":
        opt.load_state_dict(copy.deepcopy(checkpoint))  # the loaded state tensors become the optimizer's
    else:
        getattr(opt, what)(*targets)


def check_schedule(rank, world, sent, as_view):
    """The hook against plain DDP (grads, params) and against torch's allreduce_hook (bytes), through SCHEDULE."""
    plain_model, hooked_model, counted_model = make_model(), make_model(), make_model()
    kwargs = {"bucket_cap_mb": BUCKET_MB, "gradient_as_bucket_view": as_view}
    plain, hooked, counted = DDP(plain_model, **kwargs), DDP(hooked_model, **kwargs), DDP(counted_model, **kwargs)
    plain_opt = frozenopt.AdamW(plain, lr=1e-2, weight_decay=0.05, mask_only=True)
    opt = frozenopt.AdamW(hooked, lr=1e-2, weight_decay=0.05, mask_only=True)
    counted.register_comm_hook(None, allreduce_hook)  # plain DDP's buckets, sent from Python

    buckets = []  # per step: (params, any unfrozen) of each bucket the hook was called with

    def spy(state, bucket):
        params = bucket.parameters()
        buckets[-1].append((len(params), not all(map(opt.is_param_frozen, params))))
        return unfrozen_allreduce_hook(state, bucket)

    hooked.register_comm_hook(UnfrozenAllreduceState(opt, hooked.process_group), spy)
    checkpoint = None
    for step in range(STEPS):
        if step in SCHEDULE:
            what, targets = SCHEDULE[step]
            apply(opt, what, targets, checkpoint)
            apply(plain_opt, what, targets, checkpoint)
        if step == 3:
            checkpoint = copy.deepcopy(opt.state_dict())
        buckets.append([])
        x, y = batch(step, rank)
        nn.functional.mse_loss(plain(x), y).backward()
        nn.functional.mse_loss(counted(x), y).backward()
        plain_calls, plain_bytes = sent.take()
        nn.functional.mse_loss(hooked(x), y).backward()
        calls, sent_bytes = sent.take()

        unfrozen = [p for p in hooked_model.parameters() if not opt.is_param_frozen(p)]
        assert plain_bytes == sum(p.numel() * 4 for p in plain_model.parameters())
        assert sent_bytes == CHECK_BYTES + sum(p.numel() * 4 for p in unfrozen), (step, sent_bytes)
        assert calls == 1 + sum(has_unfrozen for _, has_unfrozen in buckets[-1]), step  # all-frozen buckets: no call
        for (n, p), q in zip(hooked_model.named_parameters(), plain_model.parameters()):
            if opt.is_param_frozen(p):
                assert torch.count_nonzero(p.grad) == 0, f"{n}: a frozen grad is not zero at step {step}"
            else:
                assert torch.equal(p.grad, q.grad), f"{n}: the grad differs from plain DDP's at step {step}"
        for o in (opt, plain_opt):
            o.step()
            o.zero_grad()
        counted_model.zero_grad()
        assert torch.equal(flat(hooked_model), flat(plain_model)), f"params differ from plain DDP at step {step}"
        assert in_sync(flat(hooked_model), world), f"ranks out of sync at step {step}"

    assert opt.frozen == plain_opt.frozen == [f"{i}.{k}" for i in range(LAYERS - 1) for k in ("weight", "bias")]
    # DDP puts every param in one bucket for the first step, then rebuilds smaller ones: the hook followed
    assert [size for size, _ in buckets[0]] == [2 * LAYERS] and len(buckets[1]) > 2
    assert any(not has_unfrozen for _, has_unfrozen in buckets[1])  # at 90% frozen, some buckets send nothing
    assert [has_unfrozen for _, has_unfrozen in buckets[7]] == [False] * len(buckets[7])


def check_errors_and_registration(rank, world, sent):
    model = make_model()
    ddp = DDP(model)
    with pytest.raises(ValueError, match="mask_only"):
        register_unfrozen_allreduce(ddp, frozenopt.AdamW(ddp, lr=0.1, mask_only=False))
    with pytest.raises(TypeError, match="frozenopt optimizer"):
        register_unfrozen_allreduce(ddp, torch.optim.AdamW(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_unfrozen_allreduce(model, frozenopt.AdamW(model, lr=0.1, mask_only=True))
    with pytest.raises(ValueError, match="holds none of the DDP module's params"):
        register_unfrozen_allreduce(ddp, frozenopt.AdamW(make_model(), lr=0.1, mask_only=True))

    opt = frozenopt.SGD(ddp, lr=0.1, momentum=0.9)  # mask_only: a DDP module's default
    state = register_unfrozen_allreduce(ddp, opt)
    assert state.optimizer is opt and state.process_group is ddp.process_group
    opt.freeze(*NINETY)
    for step in range(3):
        x, y = batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert sent.take()[1] == CHECK_BYTES + LAYER_BYTES
        assert in_sync(flat(model), world)


class SparseModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, WIDTH, sparse=True)
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids):
        return self.head(self.emb(ids))


def check_sparse_bucket(rank, world, sent):
    """A sparse grad's bucket (an Embedding with sparse=True, frozen here) is sent whole, as DDP sends it."""
    plain_model, model = SparseModel(), SparseModel()
    plain, ddp = DDP(plain_model), DDP(model)
    opt, plain_opt = frozenopt.SGD(ddp, lr=0.1), frozenopt.SGD(plain, lr=0.1)
    opt.freeze("emb")
    plain_opt.freeze("emb")
    register_unfrozen_allreduce(ddp, opt)
    for step in range(3):
        ids = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(10 * step + rank))
        for m in (plain, ddp):
            m(ids).square().mean().backward()
        assert model.emb.weight.grad.is_sparse
        assert torch.equal(model.emb.weight.grad.to_dense(), plain_model.emb.weight.grad.to_dense())
        assert torch.equal(model.head.weight.grad, plain_model.head.weight.grad)
        sent.take()
        for o in (opt, plain_opt):
            o.step()
            o.zero_grad()


def worker(rank, world):
    sent = Sent()
    dist.all_reduce = sent  # the hooks look it up at each call
    try:
        for as_view in (False, True):
            check_schedule(rank, world, sent, as_view)
        check_errors_and_registration(rank, world, sent)
        check_sparse_bucket(rank, world, sent)
    finally:
        dist.all_reduce = sent._real


def test_hook_sends_only_unfrozen_grads_and_matches_plain_ddp():
    run_distributed(worker, timeout=150)


def disagree_worker(rank, world, out_dir):
    """Rank 0 alone freezes a layer at step 2; each rank writes down what it got, then exits at once
    (a barrier on the way out would meet the other rank's pending all-reduce)."""
    model = make_model()
    ddp = DDP(model)
    opt = frozenopt.SGD(ddp, lr=0.1)
    register_unfrozen_allreduce(ddp, opt)
    got = "no error"
    try:
        for step in range(4):
            if step == 2 and rank == 0:
                opt.freeze("0")
            x, y = batch(step, rank)
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        got = f"{step}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(got)
    os._exit(0)


def test_ranks_that_freeze_differently_get_an_error_not_an_abort(tmp_path):
    run_distributed(disagree_worker, str(tmp_path), timeout=90)
    first, other = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert first.startswith("2: the ranks disagree on which params are frozen"), first
    assert other.startswith("2: "), other  # its all-reduce lost its peer: an error, not an abort


class FakeBucket:
    """What the hook reads of a DDP GradBucket: its index, flat buffer, params and their grads' views."""

    def __init__(self, index, params):
        self._index, self._params = index, params
        self._buffer = torch.zeros(sum(p.numel() for p in params) + 3)[3:]  # a buffer need not start at 0
        self._grads = list(self._buffer.split([p.numel() for p in params]))

    def index(self):
        return self._index

    def buffer(self):
        return self._buffer

    def parameters(self):
        return list(self._params)

    def gradients(self):
        return [g.view(p.shape) for g, p in zip(self._grads, self._params)]


def test_layout_merges_runs_and_follows_the_frozen_set_and_rebuilt_buckets():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)])  # 6 params of 4, 2, 4, 2, 4, 2 elements
    opt = frozenopt.AdamW(model, lr=0.1, mask_only=True)
    state = UnfrozenAllreduceState(opt)
    params = list(model.parameters())
    bucket = FakeBucket(0, params)
    opt.freeze("0.weight", "1.bias")
    layout = state.layout(bucket)
    assert (layout.sent, layout.zeroed) == ([(4, 10), (12, 18)], [(0, 4), (10, 12)])
    assert state.layout(bucket) is layout  # nothing changed: the cached one
    opt.freeze("0.weight")  # already frozen: nothing changes
    assert state.layout(bucket).sent == [(4, 10), (12, 18)]
    opt.unfreeze()
    assert (state.layout(bucket).sent, state.layout(bucket).zeroed) == ([(0, 18)], [])
    opt.freeze("*")
    assert (state.layout(bucket).sent, state.layout(bucket).zeroed) == ([], [(0, 18)])
    # DDP rebuilt its buckets: index 0 now holds other params, as many as before
    opt.load_state_dict({**opt.state_dict(), "frozen": {"params": [0, 1], "names": ["0.weight", "0.bias"]}})
    state.layout(FakeBucket(0, params[:2]))
    rebuilt = state.layout(FakeBucket(0, params[4:]))
    assert (rebuilt.sent, rebuilt.zeroed) == ([(0, 6)], [])
    assert state.layout(FakeBucket(0, params[:2])).sent == []
