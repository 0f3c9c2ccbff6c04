"""Independent jobs (registrations, carrying) in parallel processes, the cores used and not oversubscribed.

Why processes: one greedy registration is a long, mostly single-threaded optimisation, and registrations of
several supports do not depend on each other; a process per job uses every core without sharing the GIL.
Processes are *spawned* (started fresh), so nothing of the parent's state — torch's or ITK's thread pools — is
copied half-alive into them. The pool is kept between calls (a cohort pays the start-up once) and closed when the
process exits.

The budget: :func:`available_cores` (the CPUs this process may run on, or what :func:`set_cores` gave it — a
query worker of a cohort gets its share); :func:`plan` runs as many jobs at once as there are cores, each on one
thread. One thread, always: greedy's result depends on its thread count (a phantom registered with 1, 2 and 4
threads gave 182 and 240 of 46,080 voxels other labels), so a registration gives the same labels whatever the
machine, the number of supports or ``--workers`` — the cores are used by running registrations side by side.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.util import Finalize
from typing import Any, Callable, Sequence

_budget: int | None = None  # set_cores: this process's share of the machine
_pool: ProcessPoolExecutor | None = None
_pool_size = 0


def available_cores() -> int:
    """The cores this process may use: its share when :func:`set_cores` gave one, else the CPUs it may run on
    (a batch system's allocation restricts these: SLURM's --cpus-per-task, taskset)."""
    if _budget is not None:
        return _budget
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_cores(cores: int | None) -> None:
    """This process's share of the machine (None: every CPU it may run on). Process-wide, as torch.set_num_threads."""
    global _budget
    if cores is not None and int(cores) < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    _budget = None if cores is None else int(cores)


THREADS = 1  # greedy's threads per registration (see above: its result depends on them)


@dataclass(frozen=True)
class Plan:
    """How ``jobs`` independent jobs share the cores: ``processes`` at once, each job with ``threads`` threads."""
    processes: int
    threads: int = THREADS


def plan(jobs: int, cores: int | None = None) -> Plan:
    """As many processes as jobs, up to the cores (``cores``: default :func:`available_cores`), one thread each."""
    cores = available_cores() if cores is None else max(1, int(cores))
    return Plan(max(1, min(int(jobs), cores)))


def _executor(processes: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != processes:
        shutdown()
        _pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        _pool_size = processes
    return _pool


def shutdown() -> None:
    """Close the pool (its processes exit); the next parallel call starts a new one."""
    global _pool, _pool_size
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool, _pool_size = None, 0


# Closed before multiprocessing joins this process's children at exit, so a query worker of a cohort that holds a
# pool of its own exits instead of waiting on it; and before the pool's own queues are closed (their finalizers
# have priority 10), or its processes would never get the word to stop.
Finalize(None, shutdown, exitpriority=100)


def run_all(fn: Callable[..., Any], calls: Sequence[tuple], processes: int,
            done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``fn(*call)`` for every call, ``processes`` at a time in spawned processes (1: here, one after the other);
    the results in the calls' order. ``done(i, result)`` is called as each one finishes (progress lines). The
    first error is raised once the jobs running are stopped; jobs not started are cancelled."""
    results: list[Any] = [None] * len(calls)
    if processes <= 1 or len(calls) <= 1:
        for i, call in enumerate(calls):
            results[i] = fn(*call)
            if done is not None:
                done(i, results[i])
        return results
    pool = _executor(processes)
    pending: dict[Future, int] = {pool.submit(fn, *call): i for i, call in enumerate(calls)}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i = pending.pop(future)
                results[i] = future.result()
                if done is not None:
                    done(i, results[i])
    except BaseException:
        for future in pending:
            future.cancel()
        shutdown()  # a failed or interrupted call leaves no process working for nobody
        raise
    return results
