"""What the rest of the machine does while a recipe is timed.

A worker reads the machine's busy CPU time (``/proc/stat``: every process,
plus time the hypervisor gave to other machines) and its own CPU time around
each timed iteration; the difference is the CPU time everything else took
meanwhile. Averaged over a run it says how many cores others used while the
recipe was being timed, which the 1-minute load average cannot tell for a run
of a few seconds. Where ``/proc/stat`` is missing (not Linux) nothing is measured.
"""

from __future__ import annotations

import os
import time

# A run is suspect when others used more than this many cores beyond the ones the
# recipe leaves free (CPUs - torch threads) on average over its timed iterations: then
# they took a share of the recipe's cores, or of the memory bandwidth it runs on.
BUSY_CORES = 0.25

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Sample = tuple[float, float]


def cpu_sample() -> Sample | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK, time.process_time()


def others_cpu_s(before: Sample | None, after: Sample | None) -> float | None:
    """CPU seconds used by everything but this process between two samples."""
    if before is None or after is None:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))


def spare_cores(threads: int) -> int:
    """CPUs this process may run on that its torch threads leave free."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cpus - threads)
