"""The threads that judge stream requests (a stream's creation encodes its media, a chunk runs its checks), shared
fairly between clients.

`submit(client, fn)` queues `fn` and returns its Future, or raises `QueueFull` past `max_pending` jobs in all or
`per_client` of one client (so that one client's queued jobs cannot fill the queue for everyone). The workers
take the clients in turn (round robin: the next job is the oldest of the client after the one served last), so a
client with many jobs waiting delays another's by at most one job per worker, never by its whole queue. A job
whose Future was cancelled before it started is skipped. `close` takes no more jobs and cancels the waiting ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future

from .batcher import Closed, QueueFull


class FairWorkers:
    def __init__(self, workers: int, max_pending: int, per_client: int | None = None, name: str = "omniguard-stream"):
        per_client = max_pending if per_client is None else per_client
        if workers < 1 or max_pending < 1 or per_client < 1:
            raise ValueError("FairWorkers needs workers >= 1, max_pending >= 1 and per_client >= 1")
        self.max_pending, self.per_client = max_pending, per_client
        self._queues: OrderedDict[str, deque] = OrderedDict()  # clients in turn order, each its jobs in order
        self._pending = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def submit(self, client: str, fn, admitted: bool = False) -> Future:
        """`admitted`: the next slice of a request already taken (never refused for the bounds: refusing it would
        undo work already done)."""
        future = Future()
        with self._cond:
            if self._closed:
                raise Closed()
            if not admitted and (self._pending >= self.max_pending
                                 or len(self._queues.get(client, ())) >= self.per_client):
                raise QueueFull()
            self._queues.setdefault(client, deque()).append((fn, future))
            self._pending += 1
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for jobs in self._queues.values():
                for _, future in jobs:
                    future.cancel()
            self._queues.clear()
            self._pending = 0
            self._cond.notify_all()

    def _next(self):
        """The next job, taking clients in turn; None once closed."""
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            client, jobs = next(iter(self._queues.items()))
            job = jobs.popleft()
            self._pending -= 1
            del self._queues[client]
            if jobs:  # the client goes to the back of the turn
                self._queues[client] = jobs
            return job

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 (the caller gets it through the Future)
                future.set_exception(exc)
