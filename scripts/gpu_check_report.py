"""The Python parts of scripts/gpu_check.sh.

    python scripts/gpu_check_report.py env
        The Python side of the environment: Python, setuptools, torch, its
        CUDA, CUDA_HOME and ninja; the device (name, compute capability, SM
        count, memory) and the driver version; where nvcc,
        compute-sanitizer and ncu are.
    python scripts/gpu_check_report.py ptxas BUILD_LOG
        One line from the `ptxas -v` output in a build log: kernels compiled,
        registers per thread, kernels that spill.
    python scripts/gpu_check_report.py summary JSON COMMIT SECONDS [PHASE STATUS EXIT SECONDS]...
        Writes gpu_check.json: the commit, the date, the run's seconds and one
        row per phase.
"""

from __future__ import annotations

import ctypes
import json
import platform
import re
import shutil
import sys
import time


def env() -> None:
    print("python", platform.python_version(), platform.machine())
    try:
        import setuptools

        print("setuptools", setuptools.__version__)
    except ImportError:
        print("setuptools: not installed")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    except ImportError as error:
        print("torch: not importable:", error)
    else:
        print("torch", torch.__version__, "CUDA", torch.version.cuda, "CUDA_HOME", CUDA_HOME,
              "ninja", is_ninja_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            driver = ctypes.c_int(0)
            ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(driver))
            print(f"device 0: {p.name}, compute {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.1f} GiB; devices: {torch.cuda.device_count()}; "
                  f"cuDriverGetVersion: {driver.value}")
        else:
            print("torch.cuda.is_available(): False")
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        print(tool, shutil.which(tool) or "not found")


def ptxas(log: str) -> None:
    text = open(log, errors="replace").read()
    registers, spilling = [], []
    for chunk in text.split("Compiling entry function '")[1:]:
        name = chunk.split("'")[0]
        used = re.search(r"Used (\d+) registers", chunk)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
        if used:
            registers.append(int(used.group(1)))
        if spill and spill.groups() != ("0", "0"):
            spilling.append(f"{name[:60]} ({spill.group(1)}/{spill.group(2)} B)")
    spills = f"{len(spilling)} spill" + (": " + "; ".join(spilling) if spilling else "")
    print(f"ptxas: {len(registers)} kernels compiled; "
          f"registers per thread: {sorted(set(registers)) or 'none reported'}; {spills}")


def summary(path: str, commit: str, seconds: str, *phases: str) -> None:
    rows = [{"phase": n, "status": s, "exit": int(e), "seconds": int(t)}
            for n, s, e, t in zip(*[iter(phases)] * 4)]
    with open(path, "w") as f:
        json.dump({"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": int(seconds),
                   "phases": rows}, f, indent=2)


def main(argv: list[str]) -> int:
    commands = {"env": env, "ptxas": ptxas, "summary": summary}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[0]](*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
