"""The freezing recipes: one record each, and the optimizer each one builds.

Each recipe fine-tunes the same model (same seed, same data, same frozen set)
with AdamW; only the way "frozen" is expressed differs. ``RECIPE_SPECS`` holds
one ``RecipeSpec`` per recipe: its help line, its chart colour, whether it runs
by default, and how it (re)builds its optimizer for a frozen set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Recipe:
    """One recipe at work in a worker: the model, its optimizer, the frozen set it was given.

    ``set_frozen(names, targets)`` is called once before training and again at
    every stage change of the gradual schedule. It returns True when it had to
    build a new optimizer (which loses the optimizer state).
    """

    def __init__(self, name: str, model, cfg: dict[str, Any]):
        self.name = name
        self.spec = RECIPE_SPECS[name]
        self.model = model
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self.opt = None
        self.frozen: list[str] = []
        self.targets: list[Any] = []

    def set_frozen(self, frozen_names: Sequence[str], targets: Sequence[Any]) -> bool:
        frozen = set(frozen_names)
        rebuilt = self.spec.retarget(self, frozen, list(targets))
        self.frozen = sorted(frozen)
        self.targets = list(targets)
        return rebuilt

    def set_requires_grad(self, frozen: set[str]) -> None:
        for n, p in self.params.items():
            p.requires_grad_(n not in frozen)

    def torch_adamw(self, groups):
        return torch_adamw(groups, self.cfg, self.spec.name)

    def verify(self) -> None:
        """Check (outside the timed region) that frozenopt froze exactly the expected set."""
        if not self.spec.frozenopt:
            return
        got, want = sorted(self.opt.frozen), self.frozen
        if got != want:
            extra = sorted(set(got) - set(want))[:5]
            missing = sorted(set(want) - set(got))[:5]
            raise RuntimeError(
                f"frozenopt's frozen set differs from the expected one: "
                f"{len(got)} frozen vs {len(want)} expected; extra {extra}, missing {missing}")
        if self.spec.mask_only:
            wrong = [n for n, p in self.params.items() if not p.requires_grad]
            if wrong:
                raise RuntimeError(f"mask_only freeze() turned requires_grad off on {wrong[:5]}")
        else:
            wrong = [n for n in self.frozen if self.params[n].requires_grad]
            if wrong:
                raise RuntimeError(f"freeze() left requires_grad=True on {wrong[:5]}")


# -- how each recipe expresses a frozen set: returns True when it built a new optimizer ----------

def _one_optimizer(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """One torch AdamW over every param, built once; nothing frozen."""
    if recipe.opt is not None:
        return False
    recipe.opt = recipe.torch_adamw(list(recipe.params.values()))
    return True


def _requires_grad(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """requires_grad off, one torch AdamW over every param: torch skips params whose grad
    is None, so a stage change only flips requires_grad and keeps the optimizer and its state."""
    recipe.set_requires_grad(frozen)
    return _one_optimizer(recipe, frozen, targets)


def _filtered(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """requires_grad off, and a new torch AdamW over the trainable params only."""
    recipe.set_requires_grad(frozen)
    recipe.opt = recipe.torch_adamw([p for n, p in recipe.params.items() if n not in frozen])
    return True


def _lr0(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """A new torch AdamW with the frozen params in a second param group at lr=0."""
    groups = [{"params": [p for n, p in recipe.params.items() if n not in frozen]}]
    still = [p for n, p in recipe.params.items() if n in frozen]
    if still:
        groups.append({"params": still, "lr": 0.0})
    recipe.opt = recipe.torch_adamw(groups)
    return True


def _freeze_by_name(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """frozenopt.AdamW built once; opt.freeze/opt.unfreeze by the targets, as a user would."""
    opt = recipe.opt
    if opt is None:
        recipe.opt = frozenopt_adamw(recipe.model, recipe.cfg, mask_only=recipe.spec.mask_only)
        if targets:
            recipe.opt.freeze(*targets)
        return True
    if not frozen:
        opt.unfreeze()  # no argument: everything
        return False
    # Unfreeze by the targets that left the frozen list (module names such as
    # "encoder.layer.6"); fall back to exact names.
    gone = [t for t in recipe.targets if not any(t is u or t == u for u in targets)]
    newly = set(recipe.frozen) - frozen
    if gone:
        newly -= set(opt.unfreeze(*gone))
    if newly:
        opt.unfreeze(*sorted(newly))
    added = frozen - set(opt.frozen)
    if added:
        opt.freeze(*sorted(added))
    return False


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    help: str
    color: str  # in the chart
    retarget: Callable[[Recipe, set[str], list], bool]
    frozenopt: bool = False  # runs frozenopt.AdamW (else torch.optim.AdamW)
    mask_only: bool = False  # frozenopt's mask_only mode
    torch_impl: str | None = None  # torch.optim.AdamW implementation whatever --torch-impl says
    default: bool = True  # run when --recipes is not given


RECIPE_SPECS: dict[str, RecipeSpec] = {spec.name: spec for spec in [
    RecipeSpec("full", "torch AdamW, nothing frozen (reference cost)", "#9e9e9e", _one_optimizer),
    RecipeSpec("requires_grad", "requires_grad=False, all params in torch AdamW", "#5b8def", _requires_grad),
    RecipeSpec("filtered", "requires_grad=False, only trainable params in torch AdamW", "#2e5fb8", _filtered),
    RecipeSpec("lr0", "frozen params in an lr=0 param group of torch AdamW", "#e39b3b", _lr0),
    RecipeSpec("frozenopt", "frozenopt.AdamW + freeze()", "#1f9e6e", _freeze_by_name, frozenopt=True),
    RecipeSpec("frozenopt-mask", "frozenopt.AdamW(mask_only=True) + freeze()", "#7cc9a5", _freeze_by_name,
               frozenopt=True, mask_only=True),
    # What a user gets from torch.optim.AdamW without asking for fused=True.
    RecipeSpec("filtered-default", "as filtered, with torch AdamW's default implementation whatever "
               "--torch-impl says (the for-loop one on CPU; not run by default)", "#1b3a70", _filtered,
               torch_impl="default", default=False),
]}
RECIPES = [name for name, spec in RECIPE_SPECS.items() if spec.default]
ALL_RECIPES = list(RECIPE_SPECS)


# -- optimizers -------------------------------------------------------------------------------

def torch_impl(recipe: str, cfg: dict[str, Any]) -> str:
    """The torch.optim.AdamW implementation a torch recipe uses."""
    return RECIPE_SPECS[recipe].torch_impl or cfg["torch_impl"]


def arithmetic(recipe: str, cfg: dict[str, Any]) -> str:
    """Which AdamW arithmetic a recipe runs: results are bitwise comparable only within one.

    frozenopt follows torch's fused kernels; torch's default is its for-loop code
    on CPU and its foreach code on CUDA.
    """
    if RECIPE_SPECS[recipe].frozenopt:
        return "fused"
    impl = torch_impl(recipe, cfg)
    if impl == "default":
        return "foreach" if cfg["device"].startswith("cuda") else "forloop"
    return impl


def torch_adamw(groups, cfg: dict[str, Any], recipe: str):
    import torch

    kw = dict(lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    impl = torch_impl(recipe, cfg)
    if impl == "foreach":
        kw["foreach"] = True
    elif impl == "fused":
        kw["fused"] = True
    elif impl == "forloop":
        kw["foreach"] = False
    return torch.optim.AdamW(groups, **kw)


def frozenopt_adamw(model, cfg: dict[str, Any], mask_only: bool):
    import frozenopt  # imported here: the torch recipes must not need it

    return frozenopt.AdamW(model, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=cfg["weight_decay"], mask_only=mask_only)
