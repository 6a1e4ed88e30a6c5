"""Progress as data: the adapter that turns a run with a progress callback into a generator."""

import threading

import pytest

from napari_vstain.errors import Cancelled
from napari_vstain.progress import progress_reports, report


def counting_work(calls: int):
    def work(callback):
        for done in range(1, calls + 1):
            report(callback, done, calls)
        return "finished"

    return work


def drain(generator):
    """All reports of a generator and its return value."""
    reports = []
    while True:
        try:
            reports.append(next(generator))
        except StopIteration as stop:
            return reports, stop.value


def test_reports_every_call_and_returns_the_result():
    reports, result = drain(progress_reports(counting_work(4), threading.Event()))
    assert reports == [(1, 4), (2, 4), (3, 4), (4, 4)] and result == "finished"


def test_cancel_stops_the_work_at_its_next_report():
    cancel, reached = threading.Event(), []

    def work(callback):
        report(callback, 1, 100)
        cancel.wait(10)  # the user presses Cancel during the second network call
        for done in range(2, 101):
            reached.append(done)
            report(callback, done, 100)

    generator = progress_reports(work, cancel)
    assert next(generator) == (1, 100)
    cancel.set()
    with pytest.raises(Cancelled, match="after 2 of 100 network calls"):
        drain(generator)
    assert reached == [2]


def test_errors_of_the_work_reach_the_caller_and_the_lock_is_released():
    lock = threading.Lock()

    def failing(callback):
        report(callback, 1, 2)
        raise ValueError("the AF image has 3 channels")

    with pytest.raises(ValueError, match="3 channels"):
        drain(progress_reports(failing, threading.Event(), lock=lock))
    assert lock.acquire(timeout=5)


def test_closing_the_generator_cancels_the_work():
    cancel = threading.Event()
    generator = progress_reports(counting_work(1000), cancel)
    next(generator)
    generator.close()
    assert cancel.is_set()
