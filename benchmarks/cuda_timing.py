"""Timing a step on a GPU, for benchmarks/cuda_gpu.py and scripts/gpu_probe.py."""

from __future__ import annotations

import statistics

import torch


def step_seconds(step, steps: int = 20, warmup: int = 5) -> float:
    """Median over ``steps`` single steps, each between two CUDA events (host
    enqueue time included whenever the GPU waits for it)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def captured(step, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``step()`` captured in a CUDA graph after warm-up steps on a side stream; returns the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
