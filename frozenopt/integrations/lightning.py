"""Lightning callbacks that freeze and unfreeze on the optimizer Lightning holds.

Lightning's ``BaseFinetuning``/``BackboneFinetuning`` flip ``requires_grad`` and add a
param group when they unfreeze, which LR schedulers and resumed runs do not expect. These
freeze and unfreeze by name on the frozenopt optimizer returned by ``configure_optimizers``:
no new param group, and the frozen set travels in the optimizer's checkpoint. Needs
``lightning`` (the ``lightning.pytorch`` API).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback

from frozenopt.integrations import FreezeSchedule

__all__ = ["BackboneFinetuning", "FreezeCallback"]


class FreezeCallback(Callback):
    """Freeze ``freeze`` when fitting starts, then apply ``schedule`` by epoch or by step.

    ``schedule`` is ``{t: targets}``: unfreeze the targets before epoch (or optimizer step)
    ``t`` runs, counted from 0; an int value is fastai's ``freeze_to(n)``. ``keep_norm=True``
    keeps normalization layers inside frozen targets trainable; ``reset_state=True`` starts
    the optimizer state of what an entry unfreezes afresh. The callback's state (which
    entries ran) is saved in Lightning checkpoints; a resumed fit does not freeze again (the
    optimizer's checkpoint holds the frozen set) and runs only the entries still due.
    Subclasses may override ``freeze_before_training`` and ``finetune_function``, as with
    Lightning's ``BaseFinetuning`` (they get the frozenopt optimizer).
    """

    def __init__(self, schedule: Mapping[int, Any] | None = None, *, freeze: Any = (), by: str = "epoch",
                 keep_norm: bool = False, reset_state: bool = False) -> None:
        self.schedule = FreezeSchedule(schedule, freeze=freeze, by=by, keep_norm=keep_norm, reset_state=reset_state)

    def freeze_before_training(self, pl_module, optimizer) -> None:
        """At the start of a fit that is not resumed (after ``configure_optimizers``)."""

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        """At the start of every training epoch, after the schedule's entries for it."""

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning restores the optimizer's state (and with it the frozen set) right after this hook.
        self.schedule.start(trainer, pl_module)
        if not self.schedule.resumed:
            self.freeze_before_training(pl_module, self.schedule.optimizer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.schedule.by == "epoch":
            self.schedule.advance(trainer.current_epoch)
        self.finetune_function(pl_module, trainer.current_epoch, self.schedule.optimizer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.schedule.by == "step":
            self.schedule.advance(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)


class BackboneFinetuning(FreezeCallback):
    """Lightning's ``BackboneFinetuning`` on freeze/unfreeze: the backbone is frozen until
    ``unfreeze_backbone_at_epoch``, then trains in the param group it was in all along.

    ``backbone``: what to freeze (default ``"backbone"``, the attribute Lightning's callback
    requires; any name, glob, module or list works). ``train_bn=True`` keeps the backbone's
    normalization layers trainable while it is frozen (all norm types, not only BatchNorm).
    Lightning's callback also gives the backbone its own learning rate and raises it each
    epoch (``lambda_func``); here the backbone's lr is that of its param group, so put it
    in a group of its own (``frozenopt.layer_groups``) and shape it with the LR scheduler
    (e.g. ``LambdaLR`` with one function per group).
    """

    def __init__(self, unfreeze_backbone_at_epoch: int = 10, backbone: Any = "backbone", *, train_bn: bool = True,
                 reset_state: bool = False) -> None:
        super().__init__({unfreeze_backbone_at_epoch: backbone}, freeze=backbone, by="epoch", keep_norm=train_bn,
                         reset_state=reset_state)
