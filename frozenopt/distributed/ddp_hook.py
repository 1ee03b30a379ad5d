"""A DDP communication hook that all-reduces only the grads of unfrozen params.

What it is for: an optimizer in ``mask_only`` mode (the default for a DDP-wrapped model)
freezes without touching ``requires_grad``, because DDP fixes its gradient buckets when it
wraps the model. Autograd then still computes the grads of frozen params, and plain DDP
all-reduces them with the rest. This hook sends only the unfrozen part of each bucket and
follows freeze/unfreeze (and ``load_state_dict``) between steps, with no re-wrapping.

In the default mode there is nothing for it to do: params frozen before wrapping have
``requires_grad`` off and are not in DDP's buckets at all, and a default-mode freeze after
wrapping is refused by DDP itself; the hook refuses such an optimizer.

After the hook, on every rank:
- an unfrozen param's grad is the average over ranks, as plain DDP gives it (divided by the
  world size before the sum, as torch's ``allreduce_hook`` does: bitwise equal to plain DDP
  for 2 ranks, and to rounding in the sum order for more);
- a frozen param's grad is zero: its part of the bucket is zeroed, not sent. The optimizer
  skips it either way; zero keeps whatever else reads grads (``clip_grad_norm_`` over
  ``model.parameters()``, GradScaler's inf check, grad-norm logging) the same on every rank,
  where a local grad would differ from rank to rank;
- params the optimizer does not hold (trained by another optimizer, say) are sent as usual.

Every rank must freeze and unfreeze the same params at the same step, as with any change
to a DDP model. Ranks that disagree would hand all_reduce tensors of different sizes (gloo
aborts the process on that), so each step starts with a 16-byte all-reduce of a fingerprint
of the frozen set: a rank whose frozen set changed waits for it and raises a RuntimeError if
the ranks disagree (the others then fail at their next collective, or time out).
"""

from __future__ import annotations

import hashlib
import operator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["UnfrozenAllreduceState", "register_unfrozen_allreduce", "unfrozen_allreduce_hook"]


class _BucketLayout(NamedTuple):
    """Where a bucket's unfrozen and frozen params lie in its flat buffer, for one frozen set."""

    params: list[Tensor]  # the bucket's params when this was made: DDP rebuilds its buckets once
    version: int  # the optimizer's frozen_version when this was made
    sent: list[tuple[int, int]]  # [start, stop) element ranges of unfrozen params, neighbours merged
    zeroed: list[tuple[int, int]]  # the same for frozen params


def _add_range(ranges: list[tuple[int, int]], start: int, stop: int) -> None:
    if start == stop:
        return
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], stop)
    else:
        ranges.append((start, stop))


def _views(buffer: Tensor, ranges: list[tuple[int, int]]) -> list[Tensor]:
    return [buffer[start:stop] for start, stop in ranges]


class UnfrozenAllreduceState:
    """The state of :func:`unfrozen_allreduce_hook`: the optimizer whose frozen set decides what is
    sent, the process group (None: the default one), and each bucket's layout.

    A bucket's layout is worked out again only when the optimizer's ``frozen_version``
    changes or DDP has rebuilt its buckets (it does once, after the first iteration).
    """

    def __init__(self, optimizer: Any, process_group: dist.ProcessGroup | None = None) -> None:
        if not all(hasattr(optimizer, attr) for attr in ("is_param_frozen", "frozen_version", "mask_only")):
            raise TypeError(f"expected a frozenopt optimizer (SGD, Adam, AdamW), got {type(optimizer).__name__}")
        if not optimizer.mask_only:
            raise ValueError(
                "unfrozen_allreduce_hook needs an optimizer in mask_only mode (the default for a DDP "
                "module): in the default mode, params frozen before wrapping are not in DDP's buckets "
                "and freezing after wrapping turns requires_grad off, which DDP does not allow. Build "
                "the optimizer from the DDP module, or pass mask_only=True.")
        self.optimizer = optimizer
        self.process_group = process_group
        self._layouts: dict[int, _BucketLayout] = {}
        self._fingerprint: tuple[int, int, Tensor] | None = None  # frozen_version, its hash, [hash, -hash]
        self._agreed: int | None = None  # the last hash every rank was seen to have

    def layout(self, bucket: dist.GradBucket) -> _BucketLayout:
        """The bucket's layout for the current frozen set (cached)."""
        params = bucket.parameters()
        version = self.optimizer.frozen_version
        cached = self._layouts.get(bucket.index())
        if (cached is not None and cached.version == version and len(cached.params) == len(params)
                and all(map(operator.is_, cached.params, params))):
            return cached
        base = bucket.buffer().storage_offset()
        sent: list[tuple[int, int]] = []
        zeroed: list[tuple[int, int]] = []
        for p, grad in zip(params, bucket.gradients()):  # views of the buffer, in buffer order
            start = grad.storage_offset() - base
            _add_range(zeroed if self.optimizer.is_param_frozen(p) else sent, start, start + grad.numel())
        layout = _BucketLayout(params, version, sent, zeroed)
        self._layouts[bucket.index()] = layout
        return layout

    def check_ranks_agree(self, device: torch.device, group: dist.ProcessGroup) -> None:
        """Raise if the ranks' frozen sets differ; run by every rank once a step, before anything is sent.

        The fingerprint is all-reduced at every step, so that every rank issues the same
        collectives; only a rank whose frozen set changed since the ranks last agreed waits
        for it (a host sync on a GPU), so a steady run never waits.
        """
        if self._fingerprint is None or self._fingerprint[0] != self.optimizer.frozen_version:
            flags = bytes(self.optimizer.is_param_frozen(p) for _, p in self.optimizer.named_params())
            digest = int.from_bytes(hashlib.blake2b(flags, digest_size=7).digest(), "little")
            # the version read after named_params(), which takes in edits of the groups first
            self._fingerprint = (self.optimizer.frozen_version, digest, torch.tensor([digest, -digest], device=device))
        _, digest, both = self._fingerprint
        reduced = both.clone()
        work = dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group, async_op=True)
        if digest == self._agreed:
            return
        work.wait()
        highest, minus_lowest = reduced.tolist()
        if highest != -minus_lowest:
            raise RuntimeError(
                "the ranks disagree on which params are frozen: every rank must call freeze/unfreeze "
                "(and load_state_dict) the same way at the same step, as with any change to a DDP model "
                "(was one called on rank 0 only, e.g. in a rank-zero-only callback?)")
        self._agreed = digest


def _average(tensor: Tensor, group: dist.ProcessGroup) -> torch.futures.Future:
    """All-reduces ``tensor`` in place into the mean over ranks, as torch's ``allreduce_hook`` does."""
    tensor.div_(group.size())
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


# Unannotated: DDP compares a hook's annotations with the classes themselves, not with strings.
def unfrozen_allreduce_hook(state, bucket):
    """DDP communication hook: averages the unfrozen params' grads, zeroes the frozen ones'.

    ``state`` is an :class:`UnfrozenAllreduceState`, ``bucket`` a ``dist.GradBucket``;
    returns a ``torch.futures.Future[Tensor]`` of the bucket's buffer.

    Register it with ``ddp.register_comm_hook(UnfrozenAllreduceState(opt), unfrozen_allreduce_hook)``
    or :func:`register_unfrozen_allreduce`. A bucket with one unfrozen run of params is
    all-reduced in place; several runs are packed into one tensor and unpacked after; a
    bucket whose params are all frozen is not communicated at all. The bucket's buffer is
    written in place, so ``gradient_as_bucket_view=True`` keeps working.
    """
    buffer = bucket.buffer()
    group = dist.group.WORLD if state.process_group is None else state.process_group
    if bucket.index() == 0:  # DDP reduces its buckets in index order: this is the step's first call
        state.check_ranks_agree(buffer.device, group)
    if buffer.layout != torch.strided:  # a sparse grad's bucket holds that param alone: sent as DDP would
        return _average(buffer, group).then(lambda fut: fut.value()[0])
    layout = state.layout(bucket)
    if layout.zeroed:
        torch._foreach_zero_(_views(buffer, layout.zeroed))
    if not layout.sent:
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    if len(layout.sent) == 1:
        (start, stop), = layout.sent
        return _average(buffer[start:stop], group).then(lambda fut: (fut.wait(), buffer)[1])
    views = _views(buffer, layout.sent)
    packed = torch.cat(views)

    def unpack(fut: torch.futures.Future) -> Tensor:
        fut.wait()  # raises what the all-reduce raised
        torch._foreach_copy_(views, packed.split([v.numel() for v in views]))
        return buffer

    return _average(packed, group).then(unpack)


def register_unfrozen_allreduce(ddp: nn.parallel.DistributedDataParallel, optimizer: Any) -> UnfrozenAllreduceState:
    """Registers :func:`unfrozen_allreduce_hook` on ``ddp`` for ``optimizer``'s frozen set; returns its state.

    ``optimizer`` is a frozenopt optimizer in ``mask_only`` mode that holds some of the DDP
    module's params; DDP takes one communication hook per module.
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"expected a DistributedDataParallel module, got {type(ddp).__name__}")
    state = UnfrozenAllreduceState(optimizer, ddp.process_group)
    held = {id(p) for _, p in optimizer.named_params()}
    if not any(id(p) in held for p in ddp.parameters()):
        raise ValueError("the optimizer holds none of the DDP module's params: its frozen set cannot "
                         "say what to send")
    ddp.register_comm_hook(state, unfrozen_allreduce_hook)
    return state
