"""A Hugging Face ``TrainerCallback`` that freezes and unfreezes on a schedule.

The Trainer wraps the optimizer in accelerate's ``AcceleratedOptimizer``, which does not
forward ``freeze``/``unfreeze``/``frozen``; the callback finds the frozenopt optimizer
behind it (``frozenopt.integrations.find_optimizer``, also useful after ``train()``).
Needs ``transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from frozenopt.integrations import FreezeSchedule

__all__ = ["FreezeCallback"]


class FreezeCallback(TrainerCallback):
    """Freeze ``freeze`` when training starts, then apply ``schedule`` by step or by epoch.

    ``FreezeCallback({200: "bert.encoder.layer.11"}, freeze=["bert.embeddings", "bert.encoder"])``
    trains the head alone for 200 optimizer steps, then the last encoder layer too.
    ``schedule`` is ``{t: targets}`` (unfreeze the targets before step or epoch ``t``, from 0;
    an int value is fastai's ``freeze_to(n)``), ``by`` is ``"step"`` (optimizer steps, the
    Trainer's ``global_step``) or ``"epoch"``. A run resumed with ``resume_from_checkpoint``
    keeps the frozen set of its optimizer checkpoint and runs only the entries still due.
    ``keep_norm`` and ``reset_state`` are as in ``FreezeSchedule``. The optimizer must be
    a frozenopt one: ``Trainer(optimizers=(opt, scheduler))``.
    """

    def __init__(self, schedule: Mapping[int, Any] | None = None, *, freeze: Any = (), by: str = "step",
                 keep_norm: bool = False, reset_state: bool = False) -> None:
        self.schedule = FreezeSchedule(schedule, freeze=freeze, by=by, keep_norm=keep_norm, reset_state=reset_state)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        done = state.global_step if self.schedule.by == "step" else state.epoch or 0
        self.schedule.start(optimizer, model, done=done)

    def on_step_begin(self, args, state, control, **kwargs):
        # state.epoch: epochs done, as a fraction (2.5 is halfway through epoch 2, counted from 0)
        self.schedule.advance(state.global_step if self.schedule.by == "step" else math.floor(state.epoch or 0))
