"""frozenopt with torch.distributed: checkpoints (DCP) that keep the frozen set and state, and a
DDP communication hook that sends only the unfrozen params' grads."""

from frozenopt.distributed.checkpoint import load_checkpoint, save_checkpoint
from frozenopt.distributed.ddp_hook import UnfrozenAllreduceState, register_unfrozen_allreduce, unfrozen_allreduce_hook

__all__ = ["UnfrozenAllreduceState", "load_checkpoint", "register_unfrozen_allreduce", "save_checkpoint",
           "unfrozen_allreduce_hook"]
