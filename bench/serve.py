"""Benchmark of `aet serve` against in-process onnxruntime: the issue's four numbers in one run.

    python bench/serve.py            # full run, a few minutes on 2 busy cores
    python bench/serve.py --quick    # a smoke run in seconds: one short round per comparison

Two encoders with random weights (timing does not depend on them), built with onnx directly
in the exporter's graph layout (scale, flatten, Gemm+ReLU layers):
- tiny: 64-256-64-8 on 1x8x8 digits, the default digits encoder: server overhead dominates;
- large: 784-1000-500-250-32 on 1x28x28: compute-bound.

Scenarios (every server is a child `aet serve` on 127.0.0.1, ephemeral port, one onnxruntime
thread; clients run in child processes so they do not share the server's interpreter; the
in-process reference is onnxruntime with one thread in this process):
1. large, one client, batch 64 and 256: rows/s over in-process rows/s (target >= 0.9), for a
   client streaming its batches (EmbedStream, as extraction jobs do) and one waiting for each
   unary answer;
2. tiny, one client, batch 1: p50 latency minus the in-process call (target <= 0.5 ms), where
   the time goes (the server's decode/queue/run/encode from each response's `timing`; the rest
   is gRPC, network and client) and a bare grpcio server's p50 (no model) as the floor;
3. 16 concurrent one-row clients, dynamic batching on vs off: throughput ratio (target >= 3),
   p50 and p99, for both encoders;
4. server resident memory before and after 100,000 requests, after warm-up (target <= 5 %).
Comparisons alternate their sides in short rounds, so that load from other processes hits
both sides alike.
Writes bench/results/serve.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]  # runnable from a checkout without installing

import grpc  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from aet.clients.server_process import ServerProcess, temporary_server  # noqa: E402
from aet.proto import embedding_pb2, embedding_pb2_grpc  # noqa: E402
from aet.proto.codec import encode_tensor  # noqa: E402
from aet.repository import InputSpec, ModelCard, OutputSpec, write_version  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve.json"
SERVER_START_TIMEOUT = 120.0
SERVER_STOP_TIMEOUT = 60.0
CLIENTS = 16
CLIENT_PROCESSES = 4


@dataclass(frozen=True)
class Encoder:
    name: str
    sizes: tuple[int, ...]  # input features first, code size last
    image_shape: tuple[int, int, int]
    raw_max: float


TINY = Encoder("tiny", (64, 256, 64, 8), (1, 8, 8), 16.0)
LARGE = Encoder("large", (784, 1000, 500, 250, 32), (1, 28, 28), 255.0)


# -- models ----------------------------------------------------------------------------------


def encoder_graph(encoder: Encoder, seed: int = 0) -> bytes:
    """pixels (batch, C, H, W) in [0, raw_max] -> embedding (batch, code): random weights."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Div", ["pixels", "raw_max"], ["scaled"]),
        helper.make_node("Flatten", ["scaled"], ["h0"]),
    ]
    weights = [numpy_helper.from_array(np.array(encoder.raw_max, np.float32), "raw_max")]
    layers = list(pairwise(encoder.sizes))
    for i, (fan_in, fan_out) in enumerate(layers):
        weight = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        weights += [
            numpy_helper.from_array(weight.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        last = i == len(layers) - 1
        nodes.append(
            helper.make_node(
                "Gemm", [f"h{i}", f"w{i}", f"b{i}"], ["embedding" if last else f"z{i}"]
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes,
        encoder.name,
        [
            helper.make_tensor_value_info(
                "pixels", TensorProto.FLOAT, ["batch", *encoder.image_shape]
            )
        ],
        [
            helper.make_tensor_value_info(
                "embedding", TensorProto.FLOAT, ["batch", encoder.sizes[-1]]
            )
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_repository(root: Path) -> dict[str, Path]:
    """Write both encoders as version 1 into a repository; their model.onnx paths."""
    paths = {}
    for encoder in (TINY, LARGE):
        card = ModelCard.draft(
            encoder.name,
            "mlp",
            InputSpec("pixels", encoder.image_shape, "float32", (0.0, encoder.raw_max)),
            OutputSpec("embedding", "float32", encoder.sizes[-1]),
            hyperparameters={"sizes": list(encoder.sizes), "weights": "random (benchmark)"},
            preprocessing=["divide by raw_max", "flatten"],
            dataset={"name": "none"},
            opset=17,
            library_versions={"onnx": onnx.__version__},
        )
        paths[encoder.name] = (
            write_version(root, encoder.name, encoder_graph(encoder), card) / "model.onnx"
        )
    return paths


def pixels(encoder: Encoder, rows: int) -> np.ndarray:
    return np.random.default_rng(1).random(
        (rows, *encoder.image_shape), dtype=np.float32
    ) * np.float32(encoder.raw_max)


class InProcess:
    """onnxruntime in this process with one thread: the reference the server is held to."""

    def __init__(self, model_path: Path, encoder: Encoder) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.encoder = encoder

    def run_for(self, batch: int, seconds: float) -> dict:
        """Back-to-back calls at `batch` rows for `seconds`: call latencies and rows."""
        feed = {"pixels": pixels(self.encoder, batch)}
        for _ in range(5):
            self.session.run(None, feed)
        calls = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            self.session.run(None, feed)
            calls.append(time.perf_counter() - started)
        return {"latencies": calls, "rows": batch * len(calls), "seconds": sum(calls)}


# -- servers ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS missing from /proc status")


def start_server(repository: Path, *flags: str) -> AbstractContextManager[ServerProcess]:
    """A child `aet serve` with one onnxruntime thread, SERVING when the block starts; its log
    folder in /tmp is kept only if the block fails."""
    threads = ("--intra-op-threads", "1", "--inter-op-threads", "1")
    return temporary_server(repository, "aet-bench-serve-", *threads, *flags)


class _BareEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    """No model, no batcher: answers every Embed with the same tiny response."""

    def __init__(self) -> None:
        self.response = embedding_pb2.EmbedResponse(
            model=TINY.name, version=1, embeddings=encode_tensor(np.zeros((1, 8), np.float32))
        )

    def Embed(self, request, context):
        return self.response


def _bare_server(port_queue, stop_event) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(_BareEmbedding(), server)
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop_event.wait()
    server.stop(None)


# -- clients (run in child processes) -------------------------------------------------------


def _request(
    encoder_name: str, image_shape: tuple, raw_max: float, rows: int
) -> embedding_pb2.EmbedRequest:
    inputs = np.random.default_rng(1).random((rows, *image_shape), dtype=np.float32) * np.float32(
        raw_max
    )
    return embedding_pb2.EmbedRequest(model=encoder_name, inputs=encode_tensor(inputs))


def unary_clients(
    port: int,
    request: embedding_pb2.EmbedRequest,
    threads: int,
    seconds: float | None,
    calls: int | None,
) -> dict:
    """`threads` callers, each sending its next Embed when the last is answered.

    Runs for `seconds`, or until `calls` calls in all. Latencies in seconds; server timings
    (decode, queue, run, encode) in microseconds.
    """
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    for _ in range(10):
        stub.Embed(request, timeout=60)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    timings: list[list[tuple]] = [[] for _ in range(threads)]
    stop = None if seconds is None else time.perf_counter() + seconds
    per_thread = None if calls is None else calls // threads

    def caller(i: int) -> None:
        mine, timing = latencies[i], timings[i]
        while (len(mine) < per_thread) if stop is None else (time.perf_counter() < stop):
            started = time.perf_counter()
            response = stub.Embed(request, timeout=60)
            mine.append(time.perf_counter() - started)
            t = response.timing
            timing.append((t.decode_us, t.queue_us, t.run_us, t.encode_us))

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    channel.close()
    return {
        "latencies": [x for part in latencies for x in part],
        "timings": [x for part in timings for x in part],
        "seconds": elapsed,
        "client_cpu_seconds": cpu,
    }


def streaming_client(port: int, request: embedding_pb2.EmbedRequest, seconds: float) -> dict:
    """One client streaming the same batch for `seconds` (an extraction job's pattern)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    list(stub.EmbedStream(iter([request] * 3), timeout=60))
    stop = time.perf_counter() + seconds

    def requests():
        while time.perf_counter() < stop:
            yield request

    started = time.perf_counter()
    answered = sum(1 for _ in stub.EmbedStream(requests(), timeout=seconds + 60))
    elapsed = time.perf_counter() - started
    channel.close()
    return {"calls": answered, "seconds": elapsed}


class Tally:
    """Calls, rows and latencies of one scenario, summed over the rounds that measured it."""

    def __init__(self, rows_per_call: int) -> None:
        self.rows_per_call = rows_per_call
        self.calls = 0
        self.seconds = 0.0
        self.latencies: list[float] = []
        self.timings: list[tuple] = []

    def add(self, part: dict) -> None:
        latencies = part.get("latencies")
        self.calls += part["calls"] if latencies is None else len(latencies)
        self.seconds += part["seconds"]
        self.latencies += latencies or []
        self.timings += part.get("timings", [])

    def summary(self) -> dict:
        result = {
            "calls": self.calls,
            "calls_per_s": self.calls / self.seconds,
            "rows_per_s": self.rows_per_call * self.calls / self.seconds,
        }
        if self.latencies:
            result.update(p50_ms=_ms(self.latencies, 50), p99_ms=_ms(self.latencies, 99))
        return result

    def server_breakdown_us(self) -> dict:
        """Medians of the server's own decode, queue, run and encode times."""
        medians = np.median(np.array(self.timings), axis=0).tolist()
        return dict(zip(("decode", "queue", "run", "encode"), medians, strict=True))


def _ms(seconds: list[float], percentile: float) -> float:
    return float(np.percentile(seconds, percentile) * 1e3)


# -- phases ----------------------------------------------------------------------------------
# Other work on the machine drifts over a run, so every comparison alternates its sides in
# short rounds and sums them, instead of measuring one side after the other.


def measure(quick: bool) -> dict:
    rounds, round_seconds = (1, 0.5) if quick else (4, 1.5)
    memory_calls, warmup_calls = (1_000, 200) if quick else (100_000, 5_000)
    spawn = multiprocessing.get_context("spawn")
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "grpcio": grpc.__version__,
            "load_average_at_start": os.getloadavg()[0],
            "quick": quick,
            "rounds": rounds,
            "round_seconds": round_seconds,
        }
    }
    with (
        tempfile.TemporaryDirectory(prefix="aet-bench-") as tmp,
        ProcessPoolExecutor(CLIENT_PROCESSES, mp_context=spawn) as pool,
    ):
        repository = Path(tmp)
        paths = build_repository(repository)
        local = {e.name: InProcess(paths[e.name], e) for e in (TINY, LARGE)}
        with start_server(repository) as server:
            results["large_one_client"] = []
            for batch in (64, 256):
                print(f"large encoder, one client, batch {batch} ...", flush=True)
                request = _request(LARGE.name, LARGE.image_shape, LARGE.raw_max, batch)
                tallies = {k: Tally(batch) for k in ("in_process", "stream", "unary")}
                for _ in range(rounds):
                    tallies["in_process"].add(local["large"].run_for(batch, round_seconds))
                    tallies["stream"].add(
                        pool.submit(streaming_client, server.port, request, round_seconds).result()
                    )
                    tallies["unary"].add(
                        pool.submit(
                            unary_clients, server.port, request, 1, round_seconds, None
                        ).result()
                    )
                reference = tallies["in_process"].summary()["rows_per_s"]
                entry = {"batch": batch, "in_process_rows_per_s": reference, "target_ratio": 0.9}
                for kind in ("stream", "unary"):
                    rate = tallies[kind].summary()["rows_per_s"]
                    entry[f"{kind}_rows_per_s"], entry[f"{kind}_ratio"] = rate, rate / reference
                results["large_one_client"].append(entry)

            print("tiny encoder, one client, batch 1, and a bare grpcio server ...", flush=True)
            ports, stop_bare = spawn.Queue(), spawn.Event()
            bare = spawn.Process(target=_bare_server, args=(ports, stop_bare))
            bare.start()
            try:
                bare_port = ports.get(timeout=SERVER_START_TIMEOUT)
                request = _request(TINY.name, TINY.image_shape, TINY.raw_max, 1)
                tallies = {k: Tally(1) for k in ("in_process", "server", "bare")}
                server_cpu = {"server": 0.0, "bare": 0.0}
                for _ in range(rounds):
                    tallies["in_process"].add(local["tiny"].run_for(1, round_seconds))
                    for kind, port, pid in (
                        ("server", server.port, server.process.pid),
                        ("bare", bare_port, bare.pid),
                    ):
                        cpu_before = cpu_seconds(pid)
                        tallies[kind].add(
                            pool.submit(
                                unary_clients, port, request, 1, round_seconds, None
                            ).result()
                        )
                        server_cpu[kind] += cpu_seconds(pid) - cpu_before
            finally:
                stop_bare.set()
                bare.join(SERVER_STOP_TIMEOUT)
            served = tallies["server"].summary()
            local_p50 = tallies["in_process"].summary()["p50_ms"]
            inside = tallies["server"].server_breakdown_us()
            results["tiny_batch_1"] = {
                "p50_ms": served["p50_ms"],
                "p99_ms": served["p99_ms"],
                "in_process_p50_ms": local_p50,
                "overhead_p50_ms": served["p50_ms"] - local_p50,
                "bare_grpcio_p50_ms": tallies["bare"].summary()["p50_ms"],
                "server_cpu_us_per_call": 1e6 * server_cpu["server"] / tallies["server"].calls,
                "bare_grpcio_cpu_us_per_call": 1e6 * server_cpu["bare"] / tallies["bare"].calls,
                "target_overhead_ms": 0.5,
                "breakdown_p50_us": {
                    **inside,
                    "grpc_network_client": served["p50_ms"] * 1e3 - sum(inside.values()),
                },
            }

        results["sixteen_one_row_clients"] = {}
        for encoder in (LARGE, TINY):
            print(
                f"{encoder.name} encoder, {CLIENTS} one-row clients, batching on vs off ...",
                flush=True,
            )
            request = _request(encoder.name, encoder.image_shape, encoder.raw_max, 1)
            tallies = {"batching_on": Tally(1), "batching_off": Tally(1)}
            cpu = {mode: {"server": 0.0, "clients": 0.0} for mode in tallies}
            with (
                start_server(repository) as on,
                start_server(repository, "--no-dynamic-batching") as off,
            ):
                for _ in range(rounds):
                    for mode, server in (("batching_on", on), ("batching_off", off)):
                        server_cpu = cpu_seconds(server.process.pid)
                        parts = [
                            pool.submit(
                                unary_clients,
                                server.port,
                                request,
                                CLIENTS // CLIENT_PROCESSES,
                                round_seconds,
                                None,
                            )
                            for _ in range(CLIENT_PROCESSES)
                        ]
                        merged = [p.result() for p in parts]
                        cpu[mode]["server"] += cpu_seconds(server.process.pid) - server_cpu
                        cpu[mode]["clients"] += sum(m["client_cpu_seconds"] for m in merged)
                        tallies[mode].add(
                            {
                                "latencies": [x for m in merged for x in m["latencies"]],
                                "seconds": max(m["seconds"] for m in merged),
                            }
                        )
            # On a saturated machine throughput follows CPU per call, whatever the wall clock.
            modes = {
                mode: {
                    **{k: tally.summary()[k] for k in ("calls_per_s", "p50_ms", "p99_ms")},
                    "server_cpu_us_per_call": 1e6 * cpu[mode]["server"] / tally.calls,
                    "client_cpu_us_per_call": 1e6 * cpu[mode]["clients"] / tally.calls,
                }
                for mode, tally in tallies.items()
            }
            modes["ratio"] = (
                modes["batching_on"]["calls_per_s"] / modes["batching_off"]["calls_per_s"]
            )
            modes["target_ratio"] = 3.0
            results["sixteen_one_row_clients"][encoder.name] = modes

        print(f"server memory over {memory_calls:,} requests ...", flush=True)
        request = _request(TINY.name, TINY.image_shape, TINY.raw_max, 1)
        with start_server(repository) as server:

            def burst(calls: int) -> int:
                parts = [
                    pool.submit(
                        unary_clients, server.port, request, 4, None, calls // CLIENT_PROCESSES
                    )
                    for _ in range(CLIENT_PROCESSES)
                ]
                return sum(len(p.result()["latencies"]) for p in parts)

            burst(warmup_calls)
            before = rss_bytes(server.process.pid)
            answered = burst(memory_calls)
            after = rss_bytes(server.process.pid)
        results["memory"] = {
            "requests": answered,
            "clients": 4 * CLIENT_PROCESSES,
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
            "growth_percent": 100 * (after - before) / before,
            "target_growth_percent": 5.0,
        }
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    return results


def print_table(results: dict) -> None:
    rows = []
    for entry in results["large_one_client"]:
        rows.append(
            (
                f"large, 1 client, batch {entry['batch']}",
                f"stream {entry['stream_rows_per_s']:,.0f} rows/s, unary "
                f"{entry['unary_rows_per_s']:,.0f} ({entry['unary_ratio']:.2f}x), "
                f"in-process {entry['in_process_rows_per_s']:,.0f}",
                f"{entry['stream_ratio']:.2f}x",
                ">= 0.9x",
            )
        )
    tiny = results["tiny_batch_1"]
    rows.append(
        (
            "tiny, 1 client, batch 1",
            f"p50 {tiny['p50_ms']:.3f} ms (in-process {tiny['in_process_p50_ms']:.3f}, "
            f"bare grpcio {tiny['bare_grpcio_p50_ms']:.3f})",
            f"+{tiny['overhead_p50_ms']:.3f} ms",
            "<= 0.5 ms",
        )
    )
    rows.append(
        (
            "  where that p50 goes (us)",
            ", ".join(f"{k} {v:.0f}" for k, v in tiny["breakdown_p50_us"].items()),
            "",
            "",
        )
    )
    rows.append(
        (
            "  server CPU per call (us)",
            f"{tiny['server_cpu_us_per_call']:.0f} (bare grpcio "
            f"{tiny['bare_grpcio_cpu_us_per_call']:.0f})",
            "",
            "",
        )
    )
    for name, modes in results["sixteen_one_row_clients"].items():
        on, off = modes["batching_on"], modes["batching_off"]
        rows.append(
            (
                f"{name}, 16 one-row clients",
                f"on {on['calls_per_s']:,.0f}/s p50 {on['p50_ms']:.1f} p99 {on['p99_ms']:.1f}"
                f" ms; off {off['calls_per_s']:,.0f}/s p50 {off['p50_ms']:.1f} p99 "
                f"{off['p99_ms']:.1f} ms",
                f"{modes['ratio']:.2f}x",
                ">= 3x",
            )
        )
        rows.append(
            (
                "  CPU per call (us)",
                f"on: server {on['server_cpu_us_per_call']:.0f}, clients "
                f"{on['client_cpu_us_per_call']:.0f}; off: server "
                f"{off['server_cpu_us_per_call']:.0f}, clients "
                f"{off['client_cpu_us_per_call']:.0f}",
                "",
                "",
            )
        )
    memory = results["memory"]
    rows.append(
        (
            f"server RSS, {memory['requests']:,} requests",
            f"{memory['rss_before_mb']:.1f} -> {memory['rss_after_mb']:.1f} MiB after warm-up",
            f"{memory['growth_percent']:+.1f} %",
            "<= 5 %",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in [("scenario", "measured", "result", "target"), *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    machine = results["machine"]
    print(
        f"({machine['cpus']} CPUs; load average {machine['load_average_at_start']:.1f} at start, "
        f"{machine['load_average_at_end']:.1f} at end; {machine['rounds']} alternating rounds "
        f"of {machine['round_seconds']} s per side)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: 1 round of 0.5 s per side and 1,000 requests for the "
        "memory check (default: 4 rounds of 1.5 s, 100,000 requests)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help=f"where to write the JSON results (default: {RESULTS})",
    )
    args = parser.parse_args()
    results = measure(args.quick)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
