"""How many CPU threads torch should use: the user's --threads, else OMP_NUM_THREADS, else a
choice from the cores this process may use and how busy the machine is. Imports no torch
(engine.devices.apply_threads applies a choice).

Why not simply one thread per core: torch's CPU threads wait for each other at the end of every
operation, so one core taken by another program slows all of them. On a shared 2-core machine
under load, 2 threads ran 3.5-5x slower than 1; idle, 2 threads were only 1.24x faster. So
cores that the 1-minute load average says are busy are left to others (at least 1 thread).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

from .errors import UserError

MIN_THREADS, MAX_THREADS = 1, 1024
# Load below this fraction of a core counts as idle (daemons, a shell, the load's own lag).
IDLE_LOAD_MARGIN = 0.25


class ThreadChoice(NamedTuple):
    """A thread count and why (a short fragment: "machine busy: load 1.9 on 2 cores")."""

    count: int
    reason: str

    def describe(self) -> str:
        """'1 torch thread (machine busy: load 1.9 on 2 cores)'"""
        return f"{self.count} torch thread{'' if self.count == 1 else 's'} ({self.reason})"


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask), else all of the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical CPU cores of the machine (hyper-threads share one core's arithmetic units)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return int(count)
    except ImportError:
        pass
    return max(1, os.cpu_count() or 1)


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes), or None where the system has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def threads_for(cpus: int, physical: int, load: Optional[float],
                machine_cpus: Optional[int] = None) -> ThreadChoice:
    """The busy rule, with everything it depends on passed in.

    cpus: logical CPUs this process may use; physical: physical cores of the machine;
    load: the 1-minute load average (None: unknown); machine_cpus: logical CPUs of the whole
    machine (default `cpus`), over which the load is spread. Called before any work of ours
    starts, so all the load is other people's."""
    cpus, physical = max(1, int(cpus)), max(1, int(physical))
    machine_cpus = max(cpus, int(machine_cpus or cpus))
    cores = min(cpus, physical)  # two threads on one core's hyper-threads gain little
    per_core = "one per physical core" if physical < cpus else "one per core"
    if load is None:
        return ThreadChoice(cores, f"{per_core}; no load average on this system")
    # Our share of the machine's load: a process limited to 2 of 64 CPUs sees 2/64 of it.
    load_here = max(0.0, float(load)) * cpus / machine_cpus
    busy = max(0, math.ceil(load_here - IDLE_LOAD_MARGIN))
    count = max(1, cores - busy)  # leave the busy cores to others, keep one
    where = f"load {load:.1f} on {_plural(machine_cpus, 'core')}"
    if busy == 0:
        return ThreadChoice(cores, f"{per_core}, machine idle: {where}")
    return ThreadChoice(count, f"machine busy: {where}")


def check_thread_count(value, where: str = "--threads") -> int:
    """`value` as a thread count; UserError unless it is a whole number from 1 to 1,024."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where} must be a whole number of threads; got {value!r}.")
    if not MIN_THREADS <= value <= MAX_THREADS:
        raise UserError(f"{where} must be from {MIN_THREADS} to {MAX_THREADS:,} threads; "
                        f"got {value}.")
    return value


def choose_threads(requested: Optional[int] = None) -> ThreadChoice:
    """The torch CPU thread count: `requested` (from --threads) when given, else
    OMP_NUM_THREADS when set, else `threads_for` this process's CPUs and the machine's load
    now. UserError for a requested count outside 1..1024."""
    if requested is not None:
        count = check_thread_count(requested)
        return ThreadChoice(count, "asked for with --threads")
    environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if environment.isdigit() and MIN_THREADS <= int(environment) <= MAX_THREADS:
        return ThreadChoice(int(environment), f"OMP_NUM_THREADS={environment}")
    return threads_for(usable_cpus(), physical_cores(), load_average(),
                       machine_cpus=os.cpu_count())


def add_threads_argument(parser, default=None) -> None:
    """Add `--threads N` to an argparse parser (or argument group); its value is None unless
    given, for choose_threads."""
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N",
        help="torch CPU threads, 1 to 1,024 (default: OMP_NUM_THREADS if set, else one per "
             "core this process may use, minus the cores the 1-minute load average says "
             "other programs keep busy, at least 1; on a shared machine fewer threads are "
             "faster, as they wait for each other)")
