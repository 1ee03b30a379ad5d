"""Checks that the importable frozenopt is a CUDA build with its kernels
registered, and prints one line about it. Exit status 1, with the reason, if not.

    python scripts/check_cuda_build.py [--from DIR | --not-from DIR]

--from DIR: import frozenopt from the checkout DIR (an in-place build), and
fail if it comes from anywhere else. --not-from DIR: fail when frozenopt is
imported from DIR/frozenopt (a check run from outside a checkout must see the
installed package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--from", dest="from_", help="the checkout frozenopt must be imported from")
    where.add_argument("--not-from", help="a checkout frozenopt must not be imported from")
    args = parser.parse_args(argv)
    if args.from_:
        sys.path.insert(0, str(Path(args.from_).resolve()))
    import torch

    import frozenopt
    from frozenopt import ops

    problems = []
    package = Path(frozenopt.__file__).resolve().parent
    if args.not_from and package == Path(args.not_from).resolve() / "frozenopt":
        problems.append(f"imported the checkout: {frozenopt.__file__}")
    if args.from_ and package != Path(args.from_).resolve() / "frozenopt":
        problems.append(f"imported {frozenopt.__file__}, not the build in {args.from_}")
    plan = ops.require_extension().cuda_plan
    if not plan.built_with_cuda:
        problems.append("frozenopt._C was built without its CUDA sources")
    for op in ("frozenopt::sgd_", "frozenopt::adam_", "frozenopt::sgd_groups_", "frozenopt::adam_groups_"):
        for key in ("CUDA", "CPU"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                problems.append(f"{op} has no {key} kernel")
    if problems:
        print("check_cuda_build: " + "; ".join(problems), file=sys.stderr)
        return 1
    kernels = "32 KB and 4 KB" if plan.large_args_built else "4 KB only"
    line = (f"check_cuda_build: {frozenopt.__file__}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"sgd_/adam_ and their *_groups_ forms registered for CUDA and CPU, kernel-argument kernels: {kernels}, "
            f"GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        line += f", budget on device 0: {plan.device_budget(0)}"
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
