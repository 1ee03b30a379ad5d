"""frozenopt's optimizers: ``torch.optim``'s SGD, Adam and AdamW with a per-parameter freeze mask.

- ``base``: ``FreezableOptimizer``, what they share: freezing by name, the masks, the
  cached step plans, state handling and the step paths (eager, traced, sharded);
- ``state_dict``: what a checkpoint must satisfy before ``load_state_dict`` changes anything;
- ``sgd``, ``adam``, ``adamw``: one algorithm each, filling in the base class's hooks.
"""

from frozenopt.optim.adam import Adam
from frozenopt.optim.adamw import AdamW
from frozenopt.optim.base import FreezableOptimizer
from frozenopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "FreezableOptimizer"]

# Reprs and pickles name the public path, which stays when the files inside move.
for _cls in (SGD, Adam, AdamW, FreezableOptimizer):
    _cls.__module__ = __name__
del _cls
