"""DynamicBatcher: merging, splitting, queue limits, drops and failure isolation.

The model is a plain numpy function with one named output, "sum" (row sums times two, so
every output row is traceable to its input row). A `ModelGate` holds the model busy inside a
run, so that requests queue up deterministically instead of depending on thread timing.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aet.server.batcher import DynamicBatcher
from aet.server.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable

WAIT = 10.0  # seconds; a safety net so a broken batcher fails the test instead of hanging it


class ModelGate:
    """`run` for the batcher that records its batches and can hold the model busy."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.threads: list[threading.Thread] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> None:
        """The next run blocks inside the model until `open()`."""
        self.entered.clear()
        self.release.clear()

    def open(self) -> None:
        self.release.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.release.wait(WAIT)
        if (batch < 0).any():
            raise ValueError("negative input")
        return {"sum": 2 * batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}


def rows(start: int, count: int, width: int = 3) -> np.ndarray:
    """`count` rows whose values identify them: row i is (start + i) * [1, 1, ...]."""
    return np.repeat(np.arange(start, start + count, dtype=np.float32)[:, None], width, axis=1)


def expected(inputs: np.ndarray) -> np.ndarray:
    return 2 * inputs.sum(axis=1, keepdims=True)


def busy_with_one_request(batcher: DynamicBatcher, gate: ModelGate):
    """Start a request in another thread and hold the model busy with it; returns its result box."""
    gate.hold()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", batcher.submit(rows(1000, 1))))
    thread.start()
    assert gate.entered.wait(WAIT)
    return thread, box


@pytest.fixture
def gate():
    return ModelGate()


def test_lone_request_on_idle_model_runs_at_once_in_callers_thread(gate):
    batcher = DynamicBatcher(gate, max_batch_size=8, max_queue_delay=5.0, max_queue_size=4)
    inputs = rows(0, 3)
    future = batcher.submit(inputs)
    assert future.done()  # no hand-off, no wait: ran before submit returned
    np.testing.assert_array_equal(future.result()["sum"], expected(inputs))
    assert gate.threads == [threading.current_thread()]
    assert batcher.stats.batch_sizes == {3: 1}
    assert batcher.close(WAIT)


def test_requests_queued_while_busy_run_as_one_batch_each_getting_its_rows(gate):
    batcher = DynamicBatcher(gate, max_batch_size=64, max_queue_delay=0.0, max_queue_size=16)
    thread, box = busy_with_one_request(batcher, gate)
    inputs = [rows(10 * i, i + 1) for i in range(5)]  # 1..5 rows each
    futures = [batcher.submit(x) for x in inputs]
    assert not any(f.done() for f in futures)
    gate.open()
    for x, future in zip(inputs, futures, strict=True):
        np.testing.assert_array_equal(future.result(WAIT)["sum"], expected(x))
    thread.join(WAIT)
    np.testing.assert_array_equal(box["out"].result()["sum"], expected(rows(1000, 1)))
    assert batcher.stats.batch_sizes == {1: 1, 15: 1}
    np.testing.assert_array_equal(gate.batches[1], np.concatenate(inputs))  # in arrival order
    assert batcher.stats.requests == 6
    assert batcher.close(WAIT)


def test_batches_never_exceed_max_batch_size_and_whole_requests_are_not_split(gate):
    batcher = DynamicBatcher(gate, max_batch_size=8, max_queue_delay=0.0, max_queue_size=16)
    thread, _ = busy_with_one_request(batcher, gate)
    inputs = [rows(10 * i, 3) for i in range(5)]
    futures = [batcher.submit(x) for x in inputs]
    gate.open()
    for x, future in zip(inputs, futures, strict=True):
        np.testing.assert_array_equal(future.result(WAIT)["sum"], expected(x))
    thread.join(WAIT)
    # 3 + 3 fit, the third would not: it waits for the next batch instead of being split.
    assert [len(b) for b in gate.batches] == [1, 6, 6, 3]
    assert batcher.close(WAIT)


def test_oversize_request_is_split_and_its_pieces_share_batches_with_others(gate):
    batcher = DynamicBatcher(gate, max_batch_size=8, max_queue_delay=0.0, max_queue_size=16)
    thread, _ = busy_with_one_request(batcher, gate)
    big, small = rows(0, 19), rows(100, 2)
    big_future, small_future = batcher.submit(big), batcher.submit(small)
    gate.open()
    np.testing.assert_array_equal(big_future.result(WAIT)["sum"], expected(big))
    np.testing.assert_array_equal(small_future.result(WAIT)["sum"], expected(small))
    thread.join(WAIT)
    assert [len(b) for b in gate.batches] == [1, 8, 8, 5]  # 19 = 8 + 8 + 3, then 3 + 2
    assert big_future.run_seconds > 0


def test_oversize_request_on_idle_model_is_split_too(gate):
    batcher = DynamicBatcher(gate, max_batch_size=4, max_queue_delay=0.0, max_queue_size=4)
    inputs = rows(0, 10)
    np.testing.assert_array_equal(batcher.submit(inputs).result(WAIT)["sum"], expected(inputs))
    assert [len(b) for b in gate.batches] == [4, 4, 2]


def test_full_queue_raises_resource_exhausted(gate):
    batcher = DynamicBatcher(
        gate, max_batch_size=8, max_queue_delay=0.0, max_queue_size=2, name="digits/1"
    )
    thread, _ = busy_with_one_request(batcher, gate)
    queued = [batcher.submit(rows(0, 1)), batcher.submit(rows(1, 1))]
    with pytest.raises(ResourceExhausted, match=r"digits/1: queue full \(2 requests"):
        batcher.submit(rows(2, 1))
    assert batcher.stats.rejected_queue_full == 1
    gate.open()
    assert all(f.result(WAIT)["sum"].shape == (1, 1) for f in queued)
    thread.join(WAIT)


def test_expired_and_cancelled_requests_are_dropped_before_running(gate):
    batcher = DynamicBatcher(gate, max_batch_size=8, max_queue_delay=0.0, max_queue_size=8)
    thread, _ = busy_with_one_request(batcher, gate)
    expired = batcher.submit(rows(1, 1), deadline=time.monotonic() - 1)
    gone = batcher.submit(rows(2, 1), is_cancelled=lambda: True)
    withdrawn = batcher.submit(rows(3, 1))
    assert withdrawn.cancel()
    alive = batcher.submit(rows(4, 1), deadline=time.monotonic() + 60, is_cancelled=lambda: False)
    gate.open()
    np.testing.assert_array_equal(alive.result(WAIT)["sum"], expected(rows(4, 1)))
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        expired.result(WAIT)["sum"]
    with pytest.raises(Cancelled, match="client cancelled"):
        gone.result(WAIT)["sum"]
    assert withdrawn.cancelled()
    thread.join(WAIT)
    assert [b[:, 0].tolist() for b in gate.batches] == [[1000.0], [4.0]]  # the others never ran
    assert (batcher.stats.dropped_deadline, batcher.stats.dropped_cancelled) == (1, 2)


def test_expired_request_on_idle_model_never_runs(gate):
    batcher = DynamicBatcher(gate, max_batch_size=8, max_queue_delay=0.0, max_queue_size=8)
    with pytest.raises(DeadlineExceeded):
        batcher.submit(rows(0, 1), deadline=time.monotonic() - 1).result(WAIT)["sum"]
    assert gate.batches == []


def test_a_failing_request_does_not_disturb_the_requests_batched_with_it(gate):
    batcher = DynamicBatcher(gate, max_batch_size=16, max_queue_delay=0.0, max_queue_size=8)
    thread, _ = busy_with_one_request(batcher, gate)
    good_before, bad, good_after = rows(1, 2), -rows(5, 1), rows(7, 3)
    futures = [batcher.submit(x) for x in (good_before, bad, good_after)]
    gate.open()
    np.testing.assert_array_equal(futures[0].result(WAIT)["sum"], expected(good_before))
    np.testing.assert_array_equal(futures[2].result(WAIT)["sum"], expected(good_after))
    with pytest.raises(ValueError, match="negative input"):
        futures[1].result(WAIT)["sum"]
    thread.join(WAIT)
    assert batcher.stats.failed == 1
    assert [len(b) for b in gate.batches] == [1, 6, 2, 1, 3]  # merged, then each alone


def test_under_load_the_worker_waits_for_the_expected_requests(gate):
    """After a batch of 4 requests, the next batch waits (up to the delay) for 4 again."""
    batcher = DynamicBatcher(gate, max_batch_size=64, max_queue_delay=WAIT, max_queue_size=16)
    thread, _ = busy_with_one_request(batcher, gate)
    first = [batcher.submit(rows(i, 1)) for i in range(4)]
    gate.open()
    [f.result(WAIT)["sum"] for f in first]
    thread.join(WAIT)
    # The model is now "under load": these four trickle in and still share one batch.
    second = [batcher.submit(rows(10 + i, 1)) for i in range(4)]
    [f.result(WAIT)["sum"] for f in second]
    assert [len(b) for b in gate.batches] == [1, 4, 4]


def test_after_a_lone_batch_the_model_is_idle_again(gate):
    batcher = DynamicBatcher(gate, max_batch_size=64, max_queue_delay=0.01, max_queue_size=16)
    thread, _ = busy_with_one_request(batcher, gate)
    pair = [batcher.submit(rows(i, 1)) for i in range(2)]
    gate.open()
    [f.result(WAIT)["sum"] for f in pair]
    thread.join(WAIT)
    # Expecting 2, the worker gets 1: it runs it once the short delay is spent ...
    batcher.submit(rows(5, 1)).result(WAIT)["sum"]
    # ... and the next lone request runs at once in the caller's thread.
    assert batcher.submit(rows(6, 1)).done()
    assert gate.threads[-1] is threading.current_thread()
    assert [len(b) for b in gate.batches] == [1, 2, 1, 1]


def test_without_merging_every_request_runs_alone(gate):
    batcher = DynamicBatcher(
        gate, max_batch_size=64, max_queue_delay=0.0, max_queue_size=16, merge_requests=False
    )
    thread, _ = busy_with_one_request(batcher, gate)
    inputs = [rows(10 * i, 2) for i in range(3)]
    futures = [batcher.submit(x) for x in inputs]
    gate.open()
    for x, future in zip(inputs, futures, strict=True):
        np.testing.assert_array_equal(future.result(WAIT)["sum"], expected(x))
    thread.join(WAIT)
    assert [len(b) for b in gate.batches] == [1, 2, 2, 2]


def test_listeners_see_every_batch(gate):
    batcher = DynamicBatcher(gate, max_batch_size=64, max_queue_delay=0.0, max_queue_size=16)
    records = []
    batcher.stats.listeners.append(records.append)
    thread, _ = busy_with_one_request(batcher, gate)
    futures = [batcher.submit(rows(i, 2)) for i in range(3)]
    gate.open()
    [f.result(WAIT)["sum"] for f in futures]
    thread.join(WAIT)
    assert [(r.rows, r.requests, len(r.queue_seconds)) for r in records] == [(1, 1, 1), (6, 3, 3)]
    assert all(r.run_seconds > 0 for r in records)


def test_close_finishes_queued_requests_and_refuses_new_ones(gate):
    batcher = DynamicBatcher(
        gate, max_batch_size=64, max_queue_delay=0.0, max_queue_size=16, name="digits/2"
    )
    thread, _ = busy_with_one_request(batcher, gate)
    queued = [batcher.submit(rows(i, 1)) for i in range(3)]
    assert not batcher.close(timeout=0)  # closed, but the queue is still being worked off
    with pytest.raises(Unavailable, match="digits/2: shutting down"):
        batcher.submit(rows(9, 1))
    gate.open()
    assert batcher.close(WAIT)
    thread.join(WAIT)
    assert [f.result(0)["sum"].tolist() for f in queued] == [[[0.0]], [[6.0]], [[12.0]]]


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        DynamicBatcher(lambda x: x, max_batch_size=0, max_queue_delay=0.0, max_queue_size=1)
    with pytest.raises(ValueError, match="instances >= 1.*got 1, 1, 0.0 and 0"):
        DynamicBatcher(
            lambda x: x, max_batch_size=1, max_queue_delay=0.0, max_queue_size=1, instances=0
        )


class InstanceGate:
    """`run` for a batcher with several instances: each run waits inside the model until
    `open()`; `inside` counts the runs in the model at once."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.inside = threading.Semaphore(0)
        self.release = threading.Event()

    def open(self) -> None:
        self.release.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        self.inside.release()
        assert self.release.wait(WAIT)
        return {"sum": 2 * batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}


def test_instances_run_batches_at_once_and_queue_only_when_all_are_busy():
    gate = InstanceGate()
    batcher = DynamicBatcher(
        gate, max_batch_size=64, max_queue_delay=0.0, max_queue_size=16, instances=2
    )
    boxes = [{}, {}]
    threads = [
        threading.Thread(
            target=lambda box=box, i=i: box.setdefault("out", batcher.submit(rows(i, 1)))
        )
        for i, box in enumerate(boxes)
    ]
    for thread in threads:
        thread.start()
        assert gate.inside.acquire(timeout=WAIT)  # each runs at once: a free instance took it
    queued = [batcher.submit(rows(10 + i, 1)) for i in range(3)]  # both instances busy
    assert batcher.queued_requests == 3 and not any(f.done() for f in queued)
    gate.open()
    for i, future in enumerate(queued):
        np.testing.assert_array_equal(future.result(WAIT)["sum"], expected(rows(10 + i, 1)))
    for thread, box, i in zip(threads, boxes, range(2), strict=True):
        thread.join(WAIT)
        np.testing.assert_array_equal(box["out"].result(0)["sum"], expected(rows(i, 1)))
    assert sorted(len(b) for b in gate.batches) == [1, 1, 3]  # the queue ran as one batch
    assert batcher.stats.requests == 5 and batcher.stats.batches == 3
    assert batcher.close(WAIT)


def test_a_queue_longer_than_one_batch_is_shared_by_the_instances():
    gate = InstanceGate()
    batcher = DynamicBatcher(
        gate, max_batch_size=2, max_queue_delay=0.0, max_queue_size=16, instances=2
    )
    holders = [threading.Thread(target=batcher.submit, args=(rows(i, 1),)) for i in range(2)]
    for thread in holders:
        thread.start()
        assert gate.inside.acquire(timeout=WAIT)
    queued = [batcher.submit(rows(10 + i, 1)) for i in range(4)]
    gate.open()
    for i, future in enumerate(queued):
        np.testing.assert_array_equal(future.result(WAIT)["sum"], expected(rows(10 + i, 1)))
    for thread in holders:
        thread.join(WAIT)
    assert sorted(len(b) for b in gate.batches) == [1, 1, 2, 2]
    assert batcher.close(WAIT)


def test_every_named_output_is_split_and_reassembled_by_rows():
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"sum": expected(batch), "first": batch[:, 0].copy()}

    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay=0.0, max_queue_size=4)
    inputs = rows(0, 10)  # three runs of 4, 4 and 2 rows
    outputs = batcher.submit(inputs).result(WAIT)
    assert set(outputs) == {"sum", "first"} and batcher.stats.batches == 3
    np.testing.assert_array_equal(outputs["sum"], expected(inputs))
    np.testing.assert_array_equal(outputs["first"], inputs[:, 0])
    assert batcher.close(WAIT)
