"""Independent CPU tasks on forked worker processes, each result handed back as it ends.

Cells of a survey tile and field sets of a benchmark are independent: on a CPU, ``jobs``
processes of ``cpu_count // jobs`` torch threads each beat one process of all the threads (SEP,
NumPy and the FFT metacal's Python run on one core; 1.37x with 2 processes on 2 cores for the
cell path). Workers are forked, so they share what the parent has loaded (a model, built
operators) without pickling it: what a task needs beyond its own arguments (a model) is given
to :func:`run_tasks` as ``shared`` and read back with :func:`shared`. A task's function (a
module-level one) and its arguments are pickled. On an error or an interrupt the queued tasks are
cancelled and the running ones ended: a caller that caches each result as it arrives loses only
the tasks in flight.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch

from deblend.core.arguments import require_positive_int


_SHARED: Any = None


def shared() -> Any:
    """The ``shared`` object of the running :func:`run_tasks` (in this process or a worker)."""
    return _SHARED


def require_cpu(jobs: int, device: Any) -> None:
    """Refuse ``jobs`` > 1 with a model on another device than the CPU (workers are CPU
    processes), a ValueError saying so."""
    if jobs > 1 and str(device).split(":")[0] != "cpu":
        raise ValueError(f"jobs > 1 runs forked CPU processes, the model is on {device}: "
                         f"use jobs=1, or the CPU")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel queued tasks and end running ones now (their results were never handed back)."""
    processes = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        process.terminate()


def run_tasks(function: Callable[..., Any], tasks: Sequence[tuple], jobs: int,
              on_result: Callable[[int, Any], None], shared: Any = None) -> None:
    """``function(*task)`` for every task, ``on_result(index, result)`` in the parent as each
    ends (in order of completion with ``jobs`` > 1, in order with 1, in this process);
    ``function`` reads ``shared`` with :func:`shared`."""
    global _SHARED
    jobs = require_positive_int(jobs, "jobs")
    _SHARED = shared
    if jobs == 1 or len(tasks) <= 1:
        for index, task in enumerate(tasks):
            on_result(index, function(*task))
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        try:
            pending = {pool.submit(function, *task): index for index, task in enumerate(tasks)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(pending.pop(future), future.result())
        except BaseException:
            _stop_workers(pool)
            raise
