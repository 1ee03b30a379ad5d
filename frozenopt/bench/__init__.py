"""``frozenopt-bench``: freezing recipes compared side by side on one fine-tuning run.

The user-facing benchmark, installed with the package: run ``python -m
frozenopt.bench --help`` (or the ``frozenopt-bench`` console script). ``main(argv)``
is the entry point; ``RECIPES`` lists the recipes run by default (``--scenario
layers``; ``recipes.scenario_recipes`` gives any scenario's). The developer
benchmarks of frozenopt's own parts are the scripts in ``benchmarks/`` of a checkout.

- ``__main__``: the command line and the files it writes;
- ``runner``: every recipe, round after round, each in a fresh worker process;
  the rounds merged, the trained weights compared;
- ``worker``: one recipe's run inside its worker process;
- ``recipes``: one record per recipe and the optimizer it builds;
- ``models``, ``targets``: the model and data, the ``--freeze`` targets as names;
- ``report``: the table, the Markdown and the chart; ``progress``: the progress bar;
- ``machine``, ``load``: the machine, and what else it does while a recipe is timed.
"""

from .recipes import RECIPES

__all__ = ["RECIPES", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
