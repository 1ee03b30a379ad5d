"""frozenopt: fused SGD, Adam and AdamW with a per-parameter freeze mask.

``import frozenopt as optim`` is the whole migration from ``torch.optim``;
then ``opt.freeze("encoder")`` / ``opt.unfreeze()`` freeze by name, exactly,
without rebuilding anything.
"""

from frozenopt.optim import SGD, Adam, AdamW

__all__ = ["SGD", "Adam", "AdamW"]
__version__ = "0.1.0"
