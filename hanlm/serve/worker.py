"""The task worker: one thread that runs the /v1/classify, /v1/segment and /v1/ner requests, batching those
that wait together.

A classifier or tagger computes on this thread only, with torch's intra-op threads set once on it.
Run from the request thread pool instead, each request thread grew an OpenMP team of its own, and
the idle teams' workers fought the computing one for the cores: a 100,000-character text took
several times as long as on the main thread, and more with every request that had come before.

Dynamic batching: when the worker is free, it takes the first waiting request and those queued behind it
(of the same route) while their texts number at most `batch_items` together, runs all their texts
through the model as one batch, and hands each request its own results. Many clients sending a text or
two each so fill the model's batches as one client sending many would. Should a joined batch fail, its
requests run again one by one, so that an error reaches only the request whose texts caused it.

At most `max_waiting` requests wait behind the running batch; `submit` refuses the next at once
(TaskQueueFull, a 429), so no request waits without bound. A request whose client has left is
cancelled and skipped if it has not started.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from hanlm.serve.metrics import Metrics


class TaskQueueFull(Exception):
    """`max_waiting` requests already wait."""


class TaskWorkerStopped(Exception):
    """The server stopped before the request ran."""


@dataclass
class Job:
    """One request: its `items` (texts); `run` maps items (its own, or several jobs' joined) to one result
    each, in order, on the worker thread; `finish` makes the request's outcome from its items' results,
    which settles `future`. Jobs of one `key` may run as one batch (their `run`s are the same work)."""

    key: Hashable
    items: list
    run: Callable[[list], list]
    finish: Callable[[list], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Skip the request if it has not started (one that runs finishes, unread)."""
        self.cancelled.set()
        self.future.cancel()


class TaskWorker:
    """One thread, `threads` intra-op threads, at most `max_waiting` requests waiting and `batch_items` items
    in a batch of joined requests (a bigger request runs alone); `start()` launches it."""

    def __init__(self, *, max_waiting: int, threads: int, batch_items: int = 256, metrics: Metrics | None = None):
        if max_waiting < 0 or threads < 1 or batch_items < 1:
            raise ValueError(f"max_waiting must be ≥ 0, threads and batch_items ≥ 1 (got {max_waiting}, {threads}, "
                             f"{batch_items})")
        self.max_waiting, self.threads, self.batch_items = max_waiting, threads, batch_items
        self.metrics = metrics or Metrics()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="hanlm-tasks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread after the batch it runs; the waiting requests fail with TaskWorkerStopped."""
        with self._wake:
            self._stop = True
            left, self._waiting = list(self._waiting), deque()
            self.metrics.task_waiting.set(0)
            self._wake.notify()
        for job in left:
            _settle(job, exception=TaskWorkerStopped())
        self._thread.join(timeout=10)

    def submit(self, key: Hashable, items: list, run: Callable[[list], list], finish: Callable[[list], Any]) -> Job:
        """Queue a request (see Job) and return its job, whose future the outcome arrives on; TaskQueueFull
        when `max_waiting` requests wait already (those running not counted)."""
        loop = asyncio.get_running_loop()
        job = Job(key, items, run, finish, loop.create_future(), loop)
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
        while (group := self._next_group()) is not None:
            self.metrics.task_running.set(len(group))
            try:
                self._run(group)
            finally:
                self.metrics.task_running.set(0)

    def _next_group(self) -> list[Job] | None:
        """The requests to run as one batch, once some wait: the first not cancelled, and those queued right
        behind it with its key while all their items fit in `batch_items`. None once stopped."""
        with self._wake:
            while True:
                while not self._stop and not self._waiting:
                    self._wake.wait()
                if self._stop:
                    return None
                group: list[Job] = []
                items = 0
                while self._waiting:
                    job = self._waiting[0]
                    if job.cancelled.is_set():  # its client left: skipped
                        self._waiting.popleft()
                        continue
                    if group and (job.key != group[0].key or items + len(job.items) > self.batch_items):
                        break  # in order: a request that does not fit leads the next batch
                    group.append(self._waiting.popleft())
                    items += len(job.items)
                self.metrics.task_waiting.set(len(self._waiting))
                if group:
                    return group

    def _run(self, group: list[Job]) -> None:
        """Run the requests' items as one batch and settle each request with its share; when a joined batch
        fails, each request runs again alone."""
        self.metrics.task_batches.inc()
        try:
            results = group[0].run([item for job in group for item in job.items])
        except BaseException as e:  # the batch fails, the worker goes on
            if len(group) == 1:
                _settle(group[0], exception=e)
            else:
                for job in group:
                    self._run([job])
            return
        self.metrics.task_batched_requests.inc(len(group))
        at = 0
        for job in group:
            mine, at = results[at:at + len(job.items)], at + len(job.items)
            try:
                _settle(job, result=job.finish(mine))
            except BaseException as e:
                _settle(job, exception=e)


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
