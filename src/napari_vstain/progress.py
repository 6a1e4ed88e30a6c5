"""Progress as data: one callback type for every long run, and one adapter that turns a run
into a generator of progress reports (for napari's thread workers). No torch here.

A `ProgressCallback` is called as callback(done, total) after each unit of work (a network
call); returning False asks the run to stop, and the run raises `errors.Cancelled`.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generator, Optional, TypeVar

from .errors import Cancelled

ProgressCallback = Callable[[int, int], Optional[bool]]
Result = TypeVar("Result")


def report(callback: Optional[ProgressCallback], done: int, total: int) -> None:
    """Hand (done, total) to the callback; raise Cancelled when it answers False."""
    if callback is not None and callback(done, total) is False:
        raise Cancelled(f"Cancelled after {done} of {total} network calls.")


def progress_reports(work: Callable[[ProgressCallback], Result], cancel: threading.Event,
                     lock: Optional[threading.Lock] = None
                     ) -> Generator[tuple, None, Result]:
    """Run `work(callback)` on a helper thread and yield its (done, total) reports; return
    its result or raise its error. Setting `cancel`, or closing the generator, makes the work
    stop at its next report. `lock`: held while the work runs (one run at a time)."""
    reports: queue.Queue = queue.Queue()

    def callback(done: int, total: int) -> bool:
        reports.put(("progress", (int(done), int(total))))
        return not cancel.is_set()

    def run():
        try:
            if lock is None:
                reports.put(("result", work(callback)))
            else:
                with lock:
                    reports.put(("result", work(callback)))
        except BaseException as error:  # handed to the generator, which re-raises it
            reports.put(("error", error))

    threading.Thread(target=run, name="napari-vstain run", daemon=True).start()
    try:
        while True:
            kind, value = reports.get()
            if kind == "progress":
                yield value
            elif kind == "result":
                return value
            else:
                raise value
    finally:
        cancel.set()  # closed or failed: stop the work too
