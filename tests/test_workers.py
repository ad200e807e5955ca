"""Tasks on forked worker processes: every result comes back once, under its task's index, and
a failing task stops the run with its own error."""

from __future__ import annotations

import os

import pytest

from deblend.core.workers import run_tasks


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("task three is bad")
    return x


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_result_comes_back_under_its_index(jobs):
    got: dict[int, int] = {}
    pids = set()

    def keep(index: int, result: tuple[int, int]) -> None:
        assert index not in got
        got[index] = result[0]
        pids.add(result[1])

    run_tasks(square_and_pid, [(x,) for x in range(7)], jobs, keep)
    assert got == {x: x * x for x in range(7)}
    assert (os.getpid() in pids) == (jobs == 1)  # workers are other processes


def test_a_failing_task_raises_its_error():
    with pytest.raises(ValueError, match="task three is bad"):
        run_tasks(fail_on_three, [(x,) for x in range(6)], 2, lambda i, r: None)
    with pytest.raises(ValueError, match="jobs"):
        run_tasks(fail_on_three, [(1,)], 0, lambda i, r: None)


def scaled_by_shared(x: int) -> int:
    from deblend.core.workers import shared
    return x * shared()


@pytest.mark.parametrize("jobs", [1, 2])
def test_tasks_read_the_shared_object_in_every_process(jobs):
    got: dict[int, int] = {}
    run_tasks(scaled_by_shared, [(x,) for x in range(5)], jobs, got.__setitem__, shared=3)
    assert got == {x: 3 * x for x in range(5)}


def test_more_than_one_job_needs_the_cpu():
    from deblend.core.workers import require_cpu

    require_cpu(2, "cpu")
    require_cpu(1, "cuda:0")
    with pytest.raises(ValueError, match="CPU processes, the model is on cuda:0"):
        require_cpu(2, "cuda:0")
