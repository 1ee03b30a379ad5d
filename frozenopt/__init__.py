"""frozenopt: fused SGD, Adam and AdamW with a per-parameter freeze mask.

``import frozenopt as optim`` is the whole migration from ``torch.optim``:
``SGD``, ``Adam`` and ``AdamW`` are frozenopt's, every other ``torch.optim``
name (``Optimizer``, ``lr_scheduler``, ``swa_utils``, ``RMSprop``, ...) is
torch's own, re-exported. Then ``opt.freeze("encoder")`` / ``opt.unfreeze()``
freeze by name, exactly, without rebuilding anything.
"""

import sys

import torch.optim as _torch_optim

from frozenopt.finetune import FineTuner, GradualUnfreeze, frozen_bn_eval, layer_groups, spread_lr, stop_gradient
from frozenopt.optim import SGD, Adam, AdamW

# frozenopt's own names, then torch.optim's names that frozenopt does not replace (Optimizer,
# lr_scheduler, swa_utils, RMSprop, ...), taken from the torch that is loaded.
__all__ = ["SGD", "Adam", "AdamW", "FineTuner", "GradualUnfreeze", "frozen_bn_eval", "layer_groups", "spread_lr",
           "stop_gradient"]
_FROM_TORCH = [name for name in _torch_optim.__all__ if name not in __all__]
globals().update({name: getattr(_torch_optim, name) for name in _FROM_TORCH})
__all__ += _FROM_TORCH
# `from frozenopt.lr_scheduler import StepLR` works as it does for torch.optim.
for _sub in ("lr_scheduler", "swa_utils"):
    sys.modules[f"{__name__}.{_sub}"] = getattr(_torch_optim, _sub)
__version__ = "0.1.0"
