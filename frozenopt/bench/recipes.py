"""The freezing recipes: one record each, and the optimizer each one builds.

Each recipe fine-tunes the same model (same seed, same data, same frozen set)
with AdamW; only the way "frozen" is expressed differs. ``RECIPE_SPECS`` holds
one ``RecipeSpec`` per recipe: its scenario, its help line, its chart colour,
whether it runs by default, and how it (re)builds its optimizer for a frozen set.

Two scenarios: ``layers`` freezes whole params (layers, blocks); ``new-tokens``
freezes the rows of the input embedding that existed before two tokens were
added, with everything but the embedding and the head frozen whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import NewRows


class Recipe:
    """One recipe at work in a worker: the model, its optimizer, the frozen set it was given.

    ``set_frozen(names, targets)`` is called once before training and again at
    every stage change of the gradual schedule. It returns True when it had to
    build a new optimizer (which loses the optimizer state).
    """

    def __init__(self, name: str, model, cfg: dict[str, Any], rows: NewRows | None = None):
        self.name = name
        self.spec = RECIPE_SPECS[name]
        self.model = model
        self.cfg = cfg
        self.params = dict(model.named_parameters())  # the names as built, before any wrapper
        self.rows = rows  # new-tokens: the embedding rows that train
        self.opt = None
        self.frozen: list[str] = []
        self.targets: list[Any] = []
        self.after_step: Callable[[], None] | None = None  # copy-back: part of the step
        # The param whose optimizer state holds the new rows, and how to read the embedding as
        # the model sees it: the embedding weight itself, unless a wrapper holds the new rows.
        self.rows_param = self.params[rows.param] if rows else None
        self.read_embedding: Callable[[], Any] | None = None

    def step(self) -> None:
        self.opt.step()
        if self.after_step is not None:
            self.after_step()

    def weights(self) -> dict[str, Any]:
        """The trained weights by their names as built, on the CPU, the embedding as the model sees it."""
        out = {n: p.detach().to("cpu") for n, p in self.params.items()}
        if self.read_embedding is not None:
            out[self.rows.param] = self.read_embedding().detach().to("cpu")
        return out

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
        if self.rows is not None:  # opt.frozen says how much of the embedding is frozen
            self._verify_rows()
            total = self.params[self.rows.param].shape[0]
            want = sorted(want + [f"{self.rows.param} [{self.rows.old} of {total} rows frozen]"])
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

    def _verify_rows(self) -> None:
        old = self.rows.old
        mask = self.opt.frozen_mask(self.rows.param)
        per_row = mask.reshape(mask.shape[0], -1)
        if not (bool(per_row[:old].all()) and not bool(per_row[old:].any())):
            raise RuntimeError(f"frozen_mask({self.rows.param!r}) should hold exactly the first {old} rows: "
                               f"{int(per_row[:old].all(1).sum())} of them and {int(per_row[old:].any(1).sum())} "
                               f"new rows are frozen")


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


# -- new-tokens: only the new rows of the embedding (and the head) train ---------------------------

def _trainable(recipe: Recipe, frozen: set[str]) -> list:
    return [p for n, p in recipe.params.items() if n not in frozen]


def _frozenopt_rows(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """frozenopt.AdamW over every param: the rest frozen whole, the old rows frozen before the first step."""
    rows = recipe.rows
    recipe.opt = frozenopt_adamw(recipe.model, recipe.cfg, mask_only=recipe.spec.mask_only)
    recipe.opt.freeze(*targets)
    recipe.opt.freeze(rows.param, rows=slice(0, rows.old))
    return True


def _copy_back(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """torch AdamW over the whole embedding and the head; after every step the old rows are
    copied back from a copy taken before training."""
    import torch

    recipe.set_requires_grad(frozen)
    recipe.opt = recipe.torch_adamw(_trainable(recipe, frozen))
    weight, old = recipe.params[recipe.rows.param], recipe.rows.old
    saved = weight.detach()[:old].clone()

    def restore() -> None:
        with torch.no_grad():
            weight[:old].copy_(saved)

    recipe.after_step = restore
    return True


def _grad_hook(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """torch AdamW over the whole embedding and the head; a hook on the embedding's grad zeroes
    the old rows' grads. A zero grad is not a None grad: weight decay still moves those rows."""
    import torch

    recipe.set_requires_grad(frozen)
    recipe.opt = recipe.torch_adamw(_trainable(recipe, frozen))
    weight = recipe.params[recipe.rows.param]
    keep = torch.zeros(weight.shape[0], *([1] * (weight.dim() - 1)), dtype=weight.dtype, device=weight.device)
    keep[recipe.rows.old:] = 1
    weight.register_hook(lambda grad: grad * keep)
    return True


def _peft_tokens(recipe: Recipe, frozen: set[str], targets: list) -> bool:
    """PEFT's trainable-tokens layer on the embedding (the new rows in a small param of their
    own, the embedding frozen), the head trainable, torch AdamW over what trains."""
    import torch
    from peft import TrainableTokensConfig, inject_adapter_in_model

    rows = recipe.rows
    module = rows.param.rsplit(".", 1)[0]
    inject_adapter_in_model(TrainableTokensConfig(target_modules=[module], token_indices=list(rows.new_ids)),
                            recipe.model)
    # PEFT leaves only its own params trainable; the head trains too.
    for n, p in recipe.params.items():
        if n not in frozen and n != rows.param:
            p.requires_grad_(True)
    layer = recipe.model.get_submodule(module)
    (recipe.rows_param,) = [p for n, p in layer.named_parameters() if p.requires_grad]
    recipe.opt = recipe.torch_adamw([p for p in recipe.model.parameters() if p.requires_grad])
    every_id = torch.arange(recipe.params[rows.param].shape[0], device=recipe.params[rows.param].device)
    recipe.read_embedding = lambda: layer(every_id)  # PEFT's layer swaps the new rows in
    return True


def peft_tokens_missing() -> str | None:
    """Why the peft-tokens recipe cannot run here, or None."""
    try:
        import peft
    except ImportError:
        return "peft is not installed (pip install peft)"
    if not (hasattr(peft, "TrainableTokensConfig") and hasattr(peft, "inject_adapter_in_model")):
        return f"peft {peft.__version__} has no trainable-tokens layer (TrainableTokensConfig); a newer peft has"
    return None


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    help: str
    color: str  # in the chart
    retarget: Callable[[Recipe, set[str], list], bool]
    scenario: str = "layers"
    frozenopt: bool = False  # runs frozenopt.AdamW (else torch.optim.AdamW)
    mask_only: bool = False  # frozenopt's mask_only mode
    torch_impl: str | None = None  # torch.optim.AdamW implementation whatever --torch-impl says
    default: bool = True  # run when --recipes is not given
    missing: Callable[[], str | None] | None = None  # why it cannot run here (skipped), or None
    wraps: str | None = None  # the library it runs on besides torch, imported before memory is measured

    @property
    def imports(self) -> list[str]:
        """The libraries the recipe runs on besides torch."""
        out = ["frozenopt"] if self.frozenopt else []
        if self.wraps:
            out.append(self.wraps)
        return out


SCENARIOS = {
    "layers": "whole params frozen (by default everything but the top two blocks, the pooler and the classifier)",
    "new-tokens": "two tokens added to the vocabulary; only their embedding rows and the classifier train",
}

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
    RecipeSpec("frozenopt-rows", "frozenopt.AdamW + freeze(embedding, rows=old rows) before the first step",
               "#1f9e6e", _frozenopt_rows, scenario="new-tokens", frozenopt=True),
    RecipeSpec("copy-back", "torch AdamW over the embedding, the old rows copied back after every step",
               "#2e5fb8", _copy_back, scenario="new-tokens"),
    RecipeSpec("grad-hook", "torch AdamW over the embedding, a grad hook zeroing the old rows' grads",
               "#e39b3b", _grad_hook, scenario="new-tokens"),
    RecipeSpec("peft-tokens", "PEFT's trainable-tokens layer (TrainableTokensConfig) on the embedding, "
               "torch AdamW; skipped when peft lacks it", "#9c6ade", _peft_tokens, scenario="new-tokens",
               missing=peft_tokens_missing, wraps="peft"),
]}


def scenario_recipes(scenario: str, default_only: bool = False) -> list[str]:
    """The recipes of a scenario (those run without --recipes, with default_only)."""
    return [n for n, spec in RECIPE_SPECS.items()
            if spec.scenario == scenario and (spec.default or not default_only)]


RECIPES = scenario_recipes("layers", default_only=True)


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
