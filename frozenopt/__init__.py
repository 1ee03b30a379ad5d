"""frozenopt: fused SGD, Adam and AdamW with a per-parameter freeze mask.

``import frozenopt as optim`` is the whole migration from ``torch.optim``;
then ``opt.freeze("encoder")`` / ``opt.unfreeze()`` freeze by name, exactly,
without rebuilding anything.
"""

from frozenopt.optim import SGD, Adam, AdamW
from frozenopt.finetune import FineTuner, GradualUnfreeze, frozen_bn_eval, layer_groups, spread_lr, stop_gradient  # noqa: E402,I001

__all__ = ["SGD", "Adam", "AdamW", "FineTuner", "GradualUnfreeze", "frozen_bn_eval", "layer_groups", "spread_lr", "stop_gradient"]
__version__ = "0.1.0"
