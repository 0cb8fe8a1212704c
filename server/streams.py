"""Streaming calls: a bounded number of them, and each with a bounded read-ahead.

A gRPC handler thread stays with a stream for as long as the stream is open, idle or not.
`CallTracker` (a server interceptor) lets at most `max_streams` streaming calls hold threads
at once and refuses the next one with RESOURCE_EXHAUSTED at once, so unary calls and health
checks always find a free thread (the server has `workers` > `max_streams` of them). It also
counts the calls in flight, so that shutdown can tell whether it cut any.

`answer_in_order` serves one request stream: a reader thread starts each request as it
arrives (decode, check, queue on the batcher) while earlier ones are answered, so a stream's
requests batch together like concurrent unary calls; answers leave in request order. The
requests started and not yet answered stay within one `StreamWindow`: at most `requests` of
them and, before the next one is read, fewer than `bytes` bytes (so at most `bytes` plus one
message). A client that stops reading its answers therefore holds at most one window of the
server's memory per stream.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

Started = TypeVar("Started")
Answer = TypeVar("Answer")


class StreamWindow:
    """Read-ahead limits of one streaming RPC, and the largest read-ahead seen (any stream)."""

    def __init__(self, requests: int, bytes_: int) -> None:
        if requests < 1 or bytes_ < 1:
            raise ValueError(
                f"stream window: expected >= 1 request and >= 1 byte, got {requests}, {bytes_}"
            )
        self.requests = requests
        self.bytes = bytes_
        self._lock = threading.Lock()
        self.peak_requests = 0  # most requests one stream had started and not yet answered
        self.peak_bytes = 0  # most bytes of such requests one stream held

    def record(self, requests: int, bytes_: int) -> None:
        with self._lock:
            self.peak_requests = max(self.peak_requests, requests)
            self.peak_bytes = max(self.peak_bytes, bytes_)


_END = object()


class _ReadAhead:
    """The requests of one stream started and not yet answered, oldest first."""

    def __init__(self, window: StreamWindow) -> None:
        self.window = window
        self._cond = threading.Condition()
        self._started: collections.deque[tuple[Any, int]] = collections.deque()
        self._bytes = 0
        self._read_all = False  # the reader has stopped: no more requests will be started
        self._closed = False  # the call ended: stop reading and answering
        self._failure: Exception | None = None  # what stopped the reader, if not the call's end

    def read(self, requests: Iterable, start: Callable[[Any], Any]) -> None:
        """Start each request once the window has room for another."""
        try:
            for request in requests:
                size = request.ByteSize()
                started = start(request)
                with self._cond:
                    if self._closed:
                        return
                    self._started.append((started, size))
                    self._bytes += size
                    self.window.record(len(self._started), self._bytes)
                    self._cond.notify_all()
                    while not self._closed and (
                        len(self._started) >= self.window.requests
                        or self._bytes >= self.window.bytes
                    ):
                        self._cond.wait()
                    if self._closed:
                        return
        except grpc.RpcError:
            pass  # the call ended (client gone, deadline, server stopping): nothing more to read
        except Exception as exc:  # a bug in `start`: answer it (INTERNAL), never cut silently
            self._failure = exc
        finally:
            with self._cond:
                self._read_all = True
                self._cond.notify_all()

    def oldest(self) -> Any:
        """The oldest request not yet answered (waits for one); `_END` when there is none.

        Raises what stopped the reader, once the requests started before it are answered.
        """
        with self._cond:
            while not self._started and not (self._read_all or self._closed):
                self._cond.wait()
            if self._closed:
                return _END
            if self._started:
                return self._started[0][0]
            if self._failure is not None:
                raise self._failure
            return _END

    def answered(self) -> None:
        """The oldest request has been answered: make room for the next one."""
        with self._cond:
            _, size = self._started.popleft()
            self._bytes -= size
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def answer_in_order(
    requests: Iterator,
    context: grpc.ServicerContext,
    start: Callable[[Any], Started],
    finish: Callable[[Started], Answer],
    window: StreamWindow,
) -> Iterator[Answer]:
    """Yield `finish(start(request))` for each request of the stream, in request order.

    `start` runs in a reader thread as requests arrive and must not raise; `finish` runs
    here and may raise, which ends the stream with that exception.
    """
    ahead = _ReadAhead(window)
    context.add_callback(ahead.close)  # the call ended, however: wake both sides
    threading.Thread(
        target=ahead.read, args=(requests, start), name="stream-reader", daemon=True
    ).start()
    try:
        while (started := ahead.oldest()) is not _END:
            answer = finish(started)
            ahead.answered()
            yield answer
    finally:
        ahead.close()


class CallTracker(grpc.ServerInterceptor):
    """Counts calls in flight; at most `max_streams` streaming calls at once, the next ones
    get RESOURCE_EXHAUSTED (the client may retry)."""

    def __init__(self, max_streams: int) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams: expected at least 1, got {max_streams}")
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self.streams = 0  # streaming calls holding a handler thread
        self.calls = 0  # calls of any kind in flight

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming or handler.response_streaming:
            behavior, factory = _behavior(handler)
            return factory(
                self._streaming(behavior, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behavior: Callable) -> Callable:
        def counted(request, context):
            with self._lock:
                self.calls += 1
            try:
                return behavior(request, context)
            finally:
                with self._lock:
                    self.calls -= 1

        return counted

    def _streaming(self, behavior: Callable, response_streaming: bool) -> Callable:
        def limited(request_or_iterator, context):
            with self._lock:
                refused = self.streams >= self.max_streams
                if not refused:
                    self.streams += 1
                    self.calls += 1
            if refused:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"streams: {self.max_streams} streaming calls already open "
                    f"(--max-streams {self.max_streams}); retry later",
                )
            release = self._release_once()
            # The handler thread is free once the handler returns or its responses end; the
            # termination callback covers a call that ends while its generator is suspended.
            if not context.add_callback(release):
                release()
            try:
                result = behavior(request_or_iterator, context)
            except BaseException:
                release()
                raise
            if not response_streaming:
                release()
                return result
            return _released_after(result, release)

        return limited

    def _release_once(self) -> Callable[[], None]:
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.streams -= 1
                    self.calls -= 1

        return release


def _released_after(responses: Iterable, release: Callable[[], None]) -> Iterator:
    try:
        yield from responses
    finally:
        release()


def _behavior(handler: grpc.RpcMethodHandler) -> tuple[Callable, Callable]:
    """A streaming handler's behavior and the factory that builds a handler of its kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    return handler.unary_stream, grpc.unary_stream_rpc_method_handler
