"""Bytes sent per step and step time of DDP with frozenopt's unfrozen_allreduce_hook against plain
DDP, 2 processes with gloo on 127.0.0.1, a model with 90% of its elements frozen (mask_only).

    python benchmarks/bench_ddp_hook.py                       # 20 layers of 512x512, 5 repeats
    python benchmarks/bench_ddp_hook.py --layers 10 --width 256 --repeats 3 --steps 5

Configurations, each its own DDP module over the same model, one process per rank, 1 thread:
- plain: DDP's built-in all-reduce (C++), no hook;
- plain, Python hook: torch's ``allreduce_hook``, which sends DDP's buckets whole from Python
  (the cost of any Python hook, and the count of plain DDP's bytes);
- hook: ``register_unfrozen_allreduce`` with 90% of the layers frozen (``--frozen``);
- hook, nothing frozen: the hook's own cost when it has nothing to leave out.
Every configuration freezes the same layers in its (mask_only) AdamW, so the optimizer step
costs the same in all of them. Bytes: what reaches ``torch.distributed.all_reduce``, counted by
wrapping it for one step (plain DDP all-reduces in C++, out of reach of the count: it sends
what ``allreduce_hook`` sends). Step time: forward,
backward (the all-reduces), ``opt.step()``, ``zero_grad()``, timed on rank 0; the
configurations take turns within each repeat, and the figures are medians over steps, then
over repeats, with the paired ratio hook / plain. Written as JSON to
benchmarks/results/bench_ddp_hook.json (or --out).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import frozenopt
from frozenopt.bench.machine import load_average, machine_info
from frozenopt.distributed import register_unfrozen_allreduce

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_ddp_hook.json"
CONFIGS = ("plain", "plain, Python hook", "hook", "hook, nothing frozen")


def make_model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def setup(config: str, args: argparse.Namespace):
    model = make_model(args.layers, args.width)
    ddp = DDP(model)
    opt = frozenopt.AdamW(ddp, lr=1e-4, mask_only=True)
    opt.freeze(*[str(i) for i in range(args.frozen)])
    if config == "plain, Python hook":
        ddp.register_comm_hook(None, allreduce_hook)
    elif config == "hook":
        register_unfrozen_allreduce(ddp, opt)
    elif config == "hook, nothing frozen":
        register_unfrozen_allreduce(ddp, frozenopt.AdamW(ddp, lr=1e-4, mask_only=True))  # its frozen set: empty
    return ddp, opt


def step(ddp: nn.Module, opt, x: torch.Tensor) -> None:
    ddp(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def bytes_per_step(ddp: nn.Module, opt, x: torch.Tensor) -> tuple[int, int]:
    """(calls, bytes) handed to torch.distributed.all_reduce during one step."""
    real, counted = dist.all_reduce, [0, 0]

    def counting(tensor, *a, **k):
        counted[0] += 1
        counted[1] += tensor.numel() * tensor.element_size()
        return real(tensor, *a, **k)

    dist.all_reduce = counting
    try:
        step(ddp, opt, x)
    finally:
        dist.all_reduce = real
    return counted[0], counted[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    runs = {config: setup(config, args) for config in CONFIGS}
    for ddp, opt in runs.values():  # DDP rebuilds its buckets after the first step
        for _ in range(args.warmup):
            step(ddp, opt, x)
    sent = {config: bytes_per_step(*runs[config], x) for config in CONFIGS}

    times = {config: [] for config in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            dist.barrier()
            per_step = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step(*runs[config], x)
                per_step.append(time.perf_counter() - start)
            times[config].append(statistics.median(per_step) * 1e3)
    if rank == 0:
        report(args, sent, times)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, sent: dict, times: dict) -> None:
    elements = args.layers * (args.width * args.width + args.width)
    print(f"{args.layers} layers of {args.width}x{args.width} ({elements:,} elements, "
          f"{elements * 4 / 2**20:.1f} MiB of fp32 grads), {args.frozen}/{args.layers} layers frozen, "
          f"batch {args.batch}, 2 ranks (gloo, 1 thread each), medians of {args.repeats} repeats x "
          f"{args.steps} steps, load average {args.load_average_start} at start, {load_average()} at end")
    print(f"{'configuration':<22} {'all_reduce calls':>17} {'bytes sent':>14} {'vs plain':>9} "
          f"{'step ms':>9} {'vs plain':>9}")
    rows = []
    for config in CONFIGS:
        calls, sent_bytes = sent["plain, Python hook" if config == "plain" else config]
        ratios = [t / p for t, p in zip(times[config], times["plain"])]
        row = {"config": config, "all_reduce_calls": calls, "bytes_sent": sent_bytes,
               "bytes_vs_plain": sent_bytes / sent["plain, Python hook"][1],
               "step_ms": statistics.median(times[config]), "step_vs_plain": statistics.median(ratios),
               "step_ms_per_repeat": times[config]}
        rows.append(row)
        print(f"{config:<22} {calls:>17} {sent_bytes:>14,} {row['bytes_vs_plain']:>9.3f} "
              f"{row['step_ms']:>9.2f} {row['step_vs_plain']:>9.3f}")
    report = {"tool": "bench_ddp_hook", "command": " ".join(sys.argv), "args": vars(args) | {"out": str(args.out)},
              "elements": elements, "machine": machine_info(), "load_average_end": load_average(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--frozen", type=int, default=None, help="layers frozen (default: 90%% of them)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.frozen is None:
        args.frozen = round(0.9 * args.layers)
    if not 0 <= args.frozen <= args.layers:
        parser.error(f"--frozen must be between 0 and --layers ({args.layers})")
    args.load_average_start = load_average()
    mp.spawn(worker, args=(2, free_port(), args), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
