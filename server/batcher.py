"""Dynamic batching: concurrent requests for one model version share onnxruntime runs.

One `DynamicBatcher` per model version runs up to `instances` batches at a time (as Triton's
instance groups; onnxruntime sessions may run concurrently). The policy:

- Idle model (a free instance, nothing queued), lone request: it runs at once in the caller's
  thread (no hand-off, no wait), so latency at low load stays at the floor.
- Busy model (every instance running): requests queue; when a running batch ends, a worker
  thread takes what queued, oldest first, up to `max_batch_size` rows. Batches thus form from
  what arrives while the model works, and grow with the load.
- Under load only, the worker may wait up to `max_queue_delay` for the requests it expects:
  as many as the previous batch held (those callers are typically about to send again). A
  model whose last batch was a lone request is idle again, and nobody waits.
- A request bigger than `max_batch_size` is cut into pieces that fill batches; a request
  that fits one batch is never split. With `merge_requests=False` every batch holds pieces
  of one request only (dynamic batching off, for comparison).
- The queue holds at most `max_queue_size` requests; beyond it `ResourceExhausted`.
- A request whose deadline passed or whose client cancelled is dropped before it runs.
- If a merged batch fails, each of its requests is retried alone, so a bad request fails by
  itself and never takes its neighbours down.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from aet.runtime import Outputs
from aet.server.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

Run = Callable[[np.ndarray], Outputs]


class BatchFuture(Future):
    """The named outputs of one request, with where its time went once it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_seconds = 0.0  # from submit until its first rows started running
        self.run_seconds = 0.0  # time of the runs that held its rows
        self.batch_rows = 0  # rows of the batch its first rows ran in (all requests together)


class BatchRecord(NamedTuple):
    """One onnxruntime run, as reported to `BatcherStats.listeners`."""

    rows: int
    requests: int
    run_seconds: float
    queue_seconds: tuple[float, ...]  # wait of each request whose first rows ran here


@dataclass
class BatcherStats:
    """Counters since the batcher started; `listeners` see every batch (in the running thread).

    Listeners must be quick: they run between batches. Counters are written under the
    batcher's lock and are safe to read at any time.
    """

    batches: int = 0
    rows: int = 0
    requests: int = 0  # requests answered with their outputs
    failed: int = 0  # requests whose run raised
    rejected_queue_full: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # rows -> count
    listeners: list[Callable[[BatchRecord], None]] = field(default_factory=list)


class _Request:
    __slots__ = (
        "inputs",
        "rows",
        "taken",
        "deadline",
        "is_cancelled",
        "submitted",
        "future",
        "output",
    )

    def __init__(
        self, inputs: np.ndarray, deadline: float | None, is_cancelled: Callable[[], bool] | None
    ) -> None:
        self.inputs = inputs
        self.rows = len(inputs)
        self.taken = 0  # rows already handed to batches
        self.deadline = deadline
        self.is_cancelled = is_cancelled
        self.submitted = time.monotonic()
        self.future = BatchFuture()
        self.output: Outputs | None = None  # assembled here when the request is split


# (request, first row, end row) of one request's rows in a batch
_Part = tuple[_Request, int, int]


class DynamicBatcher:
    """Merge concurrent requests into runs of at most `max_batch_size` rows.

    `run` maps a (rows, ...) float32 array to named (rows, ...) outputs; it is called by at most
    `instances` threads at a time. `max_queue_delay` is in seconds.
    """

    def __init__(
        self,
        run: Run,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue_size: int,
        *,
        merge_requests: bool = True,
        instances: int = 1,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay < 0 or instances < 1:
            raise ValueError(
                f"batcher {name}: expected max_batch_size >= 1, max_queue_size >= 1, "
                f"max_queue_delay >= 0 and instances >= 1, got {max_batch_size}, "
                f"{max_queue_size}, {max_queue_delay} and {instances}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.merge_requests = merge_requests
        self.instances = instances
        self.stats = BatcherStats()
        self._run = run
        self._queue: collections.deque[_Request] = collections.deque()
        lock = threading.Lock()
        self._work_ready = threading.Condition(lock)  # idle workers wait here for a queue
        self._batch_filled = threading.Condition(lock)  # the gathering worker waits here
        self._running = 0  # batches being formed or run, at most `instances`
        self._queued_rows = 0  # rows of the queue not yet handed to a batch
        # While a worker waits for its batch to fill (`_gather`), submitters wake it only once
        # its wait can end: `_gather_missing` more requests or `_gather_room` more rows queued.
        # One wake-up per batch, not one per request: each costs a context switch and the GIL.
        # One worker gathers at a time: new requests join its batch rather than start another.
        self._gathering = False
        self._gather_missing = 0
        self._gather_room = 0
        self._closed = False
        self._last_batch_requests = 1
        self._workers = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(instances)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def queued_requests(self) -> int:
        """Requests waiting (not yet wholly handed to a batch)."""
        return len(self._queue)

    def submit(
        self,
        inputs: np.ndarray,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> BatchFuture:
        """Queue `inputs` (rows, ...) and return the future of its (rows, dim) outputs.

        `deadline` is a `time.monotonic()` instant; `is_cancelled()` says whether the caller
        has gone. Raises `ResourceExhausted` when the queue is full and `Unavailable` once the
        batcher is closed.
        """
        request = _Request(inputs, deadline, is_cancelled)
        with self._work_ready:
            if self._closed:
                raise Unavailable(f"model {self.name}: shutting down, not accepting requests")
            free = self._running < self.instances and not self._gathering
            idle = free and not self._queue and self._last_batch_requests <= 1
            if not idle or request.rows > self.max_batch_size:
                if len(self._queue) >= self.max_queue_size:
                    self.stats.rejected_queue_full += 1
                    raise ResourceExhausted(
                        f"model {self.name}: queue full ({self.max_queue_size} requests "
                        f"waiting); retry later"
                    )
                self._queue.append(request)
                self._queued_rows += request.rows
                if self._gathering:
                    if (
                        len(self._queue) >= self._gather_missing
                        or self._queued_rows >= self._gather_room
                    ):
                        self._batch_filled.notify()
                elif free:
                    self._work_ready.notify()  # else a worker looks at the queue when it is free
                return request.future
            if not self._admit(request, time.monotonic()):
                return request.future
            request.taken = request.rows
            self._running += 1
        # Idle model: run in the caller's thread, skipping the hand-off to a worker.
        try:
            self._execute([(request, 0, request.rows)])
        finally:
            self._finished_batch()
        return request.future

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish the queued ones; True if they finished within `timeout`."""
        with self._work_ready:
            self._closed = True
            self._work_ready.notify_all()
        give_up = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if give_up is None else max(0.0, give_up - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def _finished_batch(self) -> None:
        """One fewer batch running: let an idle worker take what queued meanwhile."""
        with self._work_ready:
            self._running -= 1
            if self._queue or self._closed:
                self._work_ready.notify()

    def _work(self) -> None:
        while True:
            with self._work_ready:
                while self._running >= self.instances or self._gathering or not self._queue:
                    if self._closed and not self._queue and not self._running:
                        self._work_ready.notify_all()  # the other workers end too
                        return
                    self._work_ready.wait()
                self._running += 1
                parts = self._gather()
                if self._queue and self._running < self.instances:
                    self._work_ready.notify()  # what did not fit is for another instance
            try:
                if parts:
                    self._execute(parts)
            finally:
                self._finished_batch()

    def _gather(self) -> list[_Part]:
        """Take queued rows for one batch, waiting for expected requests only under load.

        Called with the lock held; `wait` releases it so submitters can keep queueing.
        """
        parts: list[_Part] = []
        rows = self._take(parts, 0)
        if not self.merge_requests or self.max_queue_delay == 0:
            return parts
        give_up = time.monotonic() + self.max_queue_delay
        # A non-empty queue after `_take` means the batch is full or its next request does not
        # fit: waiting cannot grow this batch.
        while (
            not self._queue
            and rows < self.max_batch_size
            and len(parts) < self._last_batch_requests
        ):
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                break
            self._gathering = True
            self._gather_missing = self._last_batch_requests - len(parts)
            self._gather_room = self.max_batch_size - rows
            self._batch_filled.wait(remaining)
            self._gathering = False
            rows = self._take(parts, rows)
        return parts

    def _take(self, parts: list[_Part], rows: int) -> int:
        """Move rows from the head of the queue into `parts` while they fit; new row count."""
        now = time.monotonic()
        while self._queue and rows < self.max_batch_size:
            request = self._queue[0]
            if parts and not self.merge_requests:
                break
            room = self.max_batch_size - rows
            left = request.rows - request.taken
            if left > room and request.rows <= self.max_batch_size:
                break  # fits a batch of its own: wait for the next one rather than split it
            if not self._admit(request, now):
                self._queue.popleft()
                self._queued_rows -= left
                continue
            count = min(left, room)
            parts.append((request, request.taken, request.taken + count))
            request.taken += count
            self._queued_rows -= count
            rows += count
            if request.taken == request.rows:
                self._queue.popleft()
        return rows

    def _admit(self, request: _Request, now: float) -> bool:
        """True if `request` may run now; else it is dropped (deadline, cancel, earlier failure).

        Called with the lock held. Marks the future running when its first rows are admitted,
        so that `Future.cancel` cannot race with the result.
        """
        if request.taken == 0:
            if not request.future.set_running_or_notify_cancel():  # Future.cancel() was called
                self.stats.dropped_cancelled += 1
                return False
        elif request.future.done():  # an earlier piece of it failed or was dropped
            return False
        if request.deadline is not None and now >= request.deadline:
            self.stats.dropped_deadline += 1
            request.future.set_exception(
                DeadlineExceeded(
                    f"model {self.name}: deadline passed after "
                    f"{(now - request.submitted) * 1e3:.1f} ms in the queue; request dropped"
                )
            )
            return False
        if request.is_cancelled is not None and request.is_cancelled():
            self.stats.dropped_cancelled += 1
            request.future.set_exception(
                Cancelled(f"model {self.name}: client cancelled; request dropped")
            )
            return False
        return True

    def _execute(self, parts: list[_Part]) -> None:
        """Run one batch and hand each request its rows; isolate failures."""
        started = time.monotonic()
        waits = []
        rows = sum(end - first for _, first, end in parts)
        for request, first, _ in parts:
            if first == 0:
                request.future.queue_seconds = started - request.submitted
                request.future.batch_rows = rows
                waits.append(request.future.queue_seconds)
        try:
            if len(parts) == 1:
                request, first, end = parts[0]
                batch = request.inputs[first:end]
            else:
                # A fresh array each batch: `run` may keep or return views of its input.
                batch = np.concatenate([request.inputs[first:end] for request, first, end in parts])
            outputs = self._run(batch)
            wrong = {name: len(array) for name, array in outputs.items() if len(array) != rows}
            if wrong:
                raise RuntimeError(
                    f"model {self.name}: run returned {wrong} rows for a batch of {rows}"
                )
        except Exception as exc:
            if len(parts) > 1:
                for part in parts:  # find the culprit: the others still get their rows
                    self._execute([part])
                return
            with self._work_ready:
                self.stats.failed += 1
            parts[0][0].future.set_exception(exc)
            return
        run_seconds = time.monotonic() - started
        offset = answered = 0
        for request, first, end in parts:
            request.future.run_seconds += run_seconds
            mine = {name: array[offset : offset + end - first] for name, array in outputs.items()}
            offset += end - first
            if first == 0 and end == request.rows:
                request.future.set_result(mine)
                answered += 1
                continue
            if request.output is None:
                request.output = {
                    name: np.empty((request.rows, *array.shape[1:]), array.dtype)
                    for name, array in outputs.items()
                }
            for name, array in mine.items():
                request.output[name][first:end] = array
            if end == request.rows:
                request.future.set_result(request.output)
                answered += 1
        self._record(BatchRecord(rows, len(parts), run_seconds, tuple(waits)), answered)

    def _record(self, record: BatchRecord, answered: int) -> None:
        stats = self.stats
        with self._work_ready:
            stats.batches += 1
            stats.rows += record.rows
            stats.requests += answered
            stats.batch_sizes[record.rows] += 1
            self._last_batch_requests = record.requests
        for listener in tuple(stats.listeners):  # listeners may come and go meanwhile
            try:
                listener(record)
            except Exception:
                log.exception("batch_listener_failed", extra={"model": self.name})
