"""What a benchmark records about the machine it ran on: one helper for frozenopt-bench and benchmarks/."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def package_root() -> str:
    """The directory holding the ``frozenopt`` package this process imported (a checkout or site-packages)."""
    pkg = sys.modules.get("frozenopt")
    where = getattr(pkg, "__file__", None) or os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(os.path.abspath(where)))


def _proc_field(path: str, prefix: str) -> str | None:
    """The text after ``prefix`` on the first line of a /proc file that starts with it."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU, memory, load, Python, torch (threads, CPU capability, CUDA), frozenopt and its git commit."""
    import torch

    cpu = _proc_field("/proc/cpuinfo", "model name")
    memory = _proc_field("/proc/meminfo", "MemTotal:")
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu.lstrip(": ") if cpu else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": int(memory.split()[0]) * 1024 if memory else None,
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        import frozenopt

        info["frozenopt"] = getattr(frozenopt, "__version__", None)
    except Exception as exc:  # pragma: no cover
        info["frozenopt"] = f"import failed: {exc}"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=package_root(), timeout=5)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except Exception:
        pass
    return info
