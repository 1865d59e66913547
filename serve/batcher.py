"""A bounded queue in front of one Guard, drained by one thread in micro-batches (`Guard.moderate_batch`).

`submit` never blocks: a full queue raises `QueueFull` (the service answers 429 with Retry-After). The thread takes
the first waiting job, then whatever else arrives within `max_wait_s`, up to `max_batch` jobs; jobs with the same
Guard settings (mode, policy) run as one `moderate_batch` call, each job getting its own result in order. A job
whose caller gave up (its future cancelled) is skipped. `close` stops taking jobs and, by default, finishes the
ones queued (graceful shutdown).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds `size` jobs already."""


class Closed(Exception):
    """The batcher is shutting down and takes no new job."""


@dataclass
class Job:
    key: tuple  # (mode, policy codes or None): which Guard
    requests: list  # moderate's keyword arguments, one dict per result
    future: Future = field(default_factory=Future)


_STOP = object()


class Batcher:
    def __init__(self, guard_for, max_batch: int = 8, max_wait_s: float = 0.005, queue_size: int = 64,
                 on_batch=None):
        """`guard_for(key)`: the Guard for a job's settings. `on_batch(size, seconds)`: called after each batch."""
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("Batcher needs max_batch >= 1, queue_size >= 1 and max_wait_s >= 0")
        self.guard_for, self.max_batch, self.max_wait_s = guard_for, max_batch, max_wait_s
        self.on_batch = on_batch
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()
        self._held = None  # a job taken from the queue for the next batch
        self._thread = threading.Thread(target=self._loop, name="omniguard-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, key: tuple, requests: list) -> Future:
        if self._closed.is_set():
            raise Closed()
        job = Job(key, requests)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job.future

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """No new job; the queued ones run (drain) or are cancelled; returns when the thread has stopped."""
        self._closed.set()
        if not drain:
            if self._held is not None and self._held is not _STOP:
                self._held.future.cancel()
            while True:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    job.future.cancel()
        self.queue.put(_STOP)  # after every job already queued
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch: jobs in arrival order, at most max_batch requests in all (a job with more, alone)."""
        first, self._held = (self._held, None) if self._held is not None else (self.queue.get(), None)
        if first is _STOP:
            return None
        jobs, deadline = [first], time.monotonic() + self.max_wait_s
        while sum(len(j.requests) for j in jobs) < self.max_batch:
            if self.queue.empty() and deadline <= time.monotonic():
                break
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP or sum(len(j.requests) for j in jobs) + len(job.requests) > self.max_batch:
                self._held = job  # the next batch starts with it: this one stays within max_batch
                break
            jobs.append(job)
        return jobs

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except BaseException as exc:  # never a job left waiting: whatever failed, every caller hears it
                for job in jobs:
                    if job.future.running():
                        job.future.set_exception(exc)
                    elif not job.future.done():
                        job.future.cancel()

    def _run(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        groups: OrderedDict = OrderedDict()
        for job in live:
            groups.setdefault(job.key, []).append(job)
        for key, group in groups.items():
            start = time.perf_counter()
            try:
                guard = self.guard_for(key)
                results = guard.moderate_batch([r for j in group for r in j.requests])
                if len(results) != sum(len(j.requests) for j in group):
                    raise RuntimeError(f"moderate_batch gave {len(results)} results for "
                                       f"{sum(len(j.requests) for j in group)} requests")
            except Exception as exc:  # the Guard itself failed (not a request): every job hears it
                for job in group:
                    job.future.set_exception(exc)
                continue
            at = 0
            for job in group:
                job.future.set_result(results[at:at + len(job.requests)])
                at += len(job.requests)
            if self.on_batch is not None:
                self.on_batch(at, time.perf_counter() - start)
