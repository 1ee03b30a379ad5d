"""``frozenopt-bench``: freezing recipes compared side by side on one fine-tuning run.

Run ``python -m frozenopt.bench --help`` (or the ``frozenopt-bench`` console
script). ``main(argv)`` is the entry point; ``RECIPES`` lists the recipes.
"""

from .recipes import RECIPES

__all__ = ["RECIPES", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
