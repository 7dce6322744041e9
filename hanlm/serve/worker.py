"""The task worker: one thread that runs the /v1/classify and /v1/segment batches, one at a time.

A classifier or tagger computes on this thread only, with torch's intra-op threads set once on it.
Run from the request thread pool instead, each request thread grew an OpenMP team of its own, and
the idle teams' workers fought the computing one for the cores: a 100,000-character text took
several times as long as on the main thread, and more with every request that had come before.

At most `max_waiting` batches wait behind the running one; `submit` refuses the next at once
(TaskQueueFull, a 429), so no request waits without bound. A batch whose client has left is
cancelled and skipped if it has not started.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hanlm.serve.metrics import Metrics


class TaskQueueFull(Exception):
    """`max_waiting` batches already wait."""


class TaskWorkerStopped(Exception):
    """The server stopped before the batch ran."""


@dataclass
class Job:
    """One batch: `work` runs on the worker thread; its result or exception settles `future`."""

    work: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Skip the batch if it has not started (one that runs finishes, unread)."""
        self.cancelled.set()
        self.future.cancel()


class TaskWorker:
    """One thread, `threads` intra-op threads, at most `max_waiting` batches waiting; `start()` launches it."""

    def __init__(self, *, max_waiting: int, threads: int, metrics: Metrics | None = None):
        if max_waiting < 0 or threads < 1:
            raise ValueError(f"max_waiting must be ≥ 0 and threads ≥ 1 (got {max_waiting}, {threads})")
        self.max_waiting, self.threads = max_waiting, threads
        self.metrics = metrics or Metrics()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="hanlm-tasks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread after the batch it runs; the waiting ones fail with TaskWorkerStopped."""
        with self._wake:
            self._stop = True
            left, self._waiting = list(self._waiting), deque()
            self.metrics.task_waiting.set(0)
            self._wake.notify()
        for job in left:
            _settle(job, exception=TaskWorkerStopped())
        self._thread.join(timeout=10)

    def submit(self, work: Callable[[], Any]) -> Job:
        """Queue `work` and return its job, whose future the result arrives on; TaskQueueFull when
        `max_waiting` batches wait already (the running one not counted)."""
        loop = asyncio.get_running_loop()
        job = Job(work, loop.create_future(), loop)
        with self._wake:
            if self._stop:
                raise TaskWorkerStopped
            if len(self._waiting) >= self.max_waiting:
                raise TaskQueueFull
            self._waiting.append(job)
            self.metrics.task_waiting.set(len(self._waiting))
            self._wake.notify()
        return job

    def _work(self) -> None:
        # Per thread: OpenMP's and MKL's thread counts are settings of the thread that calls them.
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stop and not self._waiting:
                    self._wake.wait()
                if self._stop:
                    return
                job = self._waiting.popleft()
                self.metrics.task_waiting.set(len(self._waiting))
            if job.cancelled.is_set():
                continue
            self.metrics.task_running.set(1)
            try:
                result = job.work()
            except BaseException as e:  # the batch fails, the worker goes on
                _settle(job, exception=e)
            else:
                _settle(job, result=result)
            finally:
                self.metrics.task_running.set(0)


def _settle(job: Job, *, result: Any = None, exception: BaseException | None = None) -> None:
    """Hand the outcome to the job's event loop (futures are not thread-safe)."""
    def settle() -> None:
        if job.future.done():  # cancelled: nobody waits any more
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    if not job.loop.is_closed():
        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop closed in between
            pass
