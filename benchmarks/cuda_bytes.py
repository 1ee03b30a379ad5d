"""Bytes moved and launches per step of frozenopt's CUDA kernels, from their
design (no GPU needed): per optimizer and dtype, the bytes read and written
per unfrozen element against the physical floor, and, for a given model and
frozen fraction, the launches per step from the real launch planner
(frozenopt._C.cuda_plan, the code the CUDA ops run).

    python benchmarks/cuda_bytes.py --model gpt2-small --frozen 0.75

Accounting. Element traffic: each kernel reads param and grad and every state
row, and writes param and every state row, once (SGD's first momentum step
does not read the buffer). A frozen element costs 0 bytes: its blocks read
what decides them (SGD: the mask byte and found_inf; Adam: the tensor's record
written by the step launch) and return. Per-block and per-tensor extras are
counted separately and amortised over the unfrozen elements: SGD blocks read
found_inf (4 B); Adam blocks read their tensor's 40-byte record; Adam's step
launch reads and writes each step counter (8 B) and writes each record (40 B).
lr and grad_scale reads (4 B per block when they are tensors) are left out. The
floor is the element traffic of the update rule itself: SGD 3 x, SGD+momentum 5 x, Adam/AdamW 7 x (9 x with amsgrad) the
element size, i.e. 12 / 20 / 28 (36) bytes in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_models import MODELS, model_sizes  # noqa: E402

CHUNK = 65536
ADAM_RECORD_BYTES = 40  # what Adam's step launch writes per tensor for the element kernels (AdamTensorScalars)
ELEMENT_SIZES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
# name: (planner depth, element reads, element writes, floor multiple, adam step counter)
OPTIMIZERS = {
    "sgd": (2, 2, 1, 3, False),
    "sgd_momentum": (3, 3, 2, 5, False),
    "adam": (5, 4, 3, 7, True),
    "adamw": (5, 4, 3, 7, True),
    "adam_amsgrad": (6, 5, 4, 9, True),
}


def plan_module():
    try:
        from frozenopt import ops
    except ImportError as error:
        raise SystemExit(f"frozenopt is not importable ({error}): run ./run.sh test once to build it") from None
    return ops.require_extension().cuda_plan


def model_row(plan, optimizer, dtype, sizes, frozen_fraction, budget):
    depth, reads, writes, floor_k, has_step = OPTIMIZERS[optimizer]
    esize = ELEMENT_SIZES[dtype]
    n_frozen = int(round(len(sizes) * frozen_fraction))
    frozen, live = sizes[:n_frozen], sizes[n_frozen:]  # the first layers frozen, as in fine-tuning
    live_elems = sum(live)
    live_blocks = sum(-(-n // CHUNK) for n in live if n)
    all_blocks = sum(-(-n // CHUNK) for n in sizes if n)
    element_bytes = (reads + writes) * esize * live_elems
    block_bytes = live_blocks * (ADAM_RECORD_BYTES if has_step else 4)
    step_bytes = (8 + ADAM_RECORD_BYTES) * len(live) if has_step else 0
    eager_launches = plan.count_launches(depth, live, budget) + (plan.count_step_launches(len(live), budget)
                                                                  if has_step and live else 0)
    # Captured graph / torch.compile: every tensor is in the launch, the mask decides.
    graph_launches = plan.count_launches(depth, sizes, budget) + (plan.count_step_launches(len(sizes), budget)
                                                                  if has_step else 0)
    frozen_blocks = all_blocks - live_blocks
    total = element_bytes + block_bytes + step_bytes
    floor = floor_k * esize * live_elems
    return {
        "optimizer": optimizer, "dtype": dtype,
        "bytes_per_unfrozen_element": round(total / live_elems, 4) if live_elems else 0.0,
        "element_bytes_per_unfrozen_element": (reads + writes) * esize,
        "floor_bytes_per_element": floor_k * esize,
        "bytes_per_frozen_element": 0,
        # What a frozen block reads on the graph path: mask byte + found_inf, or Adam's record.
        "frozen_block_bytes_graph_path": frozen_blocks * (ADAM_RECORD_BYTES if has_step else 5),
        "bytes_per_step": total, "floor_bytes_per_step": floor,
        "ratio_to_floor": round(total / floor, 6) if floor else None,
        "launches_per_step_eager": eager_launches,
        "launches_per_step_graph": graph_launches,
        "tensors": len(sizes), "frozen_tensors": n_frozen,
        "unfrozen_elements": live_elems, "frozen_elements": sum(frozen),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    parser.add_argument("--frozen", type=float, default=0.0, help="fraction of tensors frozen, from the first")
    parser.add_argument("--budget", default="large", choices=["large", "small"],
                        help="kernel-argument budget: 32 KB (CUDA >= 12.1 driver, sm_70+) or 4 KB (the fallback)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    plan = plan_module()
    sizes = model_sizes(args.model)
    rows = [model_row(plan, o, d, sizes, args.frozen, args.budget)
            for d in args.dtypes.split(",") for o in OPTIMIZERS]
    budget_bytes = plan.budget_bytes[args.budget]
    print(f"model {args.model}: {len(sizes)} tensors, {sum(sizes):,} elements, {args.frozen:.0%} of tensors frozen; "
          f"kernel-argument budget {budget_bytes} B")
    head = f"{'optimizer':<13} {'dtype':<9} {'B/elem':>8} {'floor':>6} {'ratio':>8} {'launches eager':>15} {'graph':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['optimizer']:<13} {r['dtype']:<9} {r['bytes_per_unfrozen_element']:>8.4f} "
              f"{r['floor_bytes_per_element']:>6} {r['ratio_to_floor'] or 0:>8.4f} {r['launches_per_step_eager']:>15} "
              f"{r['launches_per_step_graph']:>6}")
    print("frozen elements: 0 B each (their blocks read one mask byte and return; the eager path does not "
          "launch them at all)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cuda_bytes_{args.model}_frozen{int(args.frozen * 100)}.json"
    path.write_text(json.dumps({"model": args.model, "frozen_fraction": args.frozen, "budget_bytes": budget_bytes,
                                "chunk": CHUNK, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
