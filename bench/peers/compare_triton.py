"""Our server against Triton (PyTriton 0.7) on the same ONNX encoders, driven by perf_analyzer.

For each encoder (the shipped one from the model repository, or with `--untrained-digits` an
untrained 64-256-64-8 MLP of the same shape, and an untrained 784-1000-500-250-32 MLP, both
built with our own model and exporter), this starts our server, the
same server with dynamic batching off (the "bare" baseline, batch 1 only) and PyTriton serving
the same model.onnx through onnxruntime behind Triton's dynamic batcher, and runs perf_analyzer
over gRPC at each batch size and concurrency. It prints rows/s and client p50/p99 side by side
and writes them to `bench/results/peers.json`. Every server is started and stopped here; every
perf_analyzer run and the whole script are bounded in time. Not part of CI.

Setup (PyTriton pins numpy < 2 and protobuf < 5, so it lives in its own virtualenv):

    python3.11 -m venv /tmp/aet-peers
    /tmp/aet-peers/bin/pip install 'nvidia-pytriton==0.7.*' onnxruntime
    apt-get install libb64-0d; pip install --no-deps tritonclient==2.51.0 python-rapidjson
    pip install nvidia-cuda-runtime-cu12      # perf_analyzer links libcudart.so.12

    python bench/peers/compare_triton.py --pytriton-python /tmp/aet-peers/bin/python

perf_analyzer sends zeros (`--input-data zero`): its default random bytes hold NaN/Inf, which
our server rejects as INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
LARGE_MODEL = "mlp-1000-500-250-32"


@dataclass(frozen=True)
class Measurement:
    """One perf_analyzer run: client-side throughput and latency percentiles."""

    server: str  # "ours", "bare" (ours without dynamic batching) or "triton"
    model: str
    batch_size: int
    concurrency: int
    rows_per_second: float
    p50_ms: float
    p99_ms: float


def shipped_encoder(repository: Path, model: str, destination: Path) -> None:
    """Copy the latest usable version of `model` into the repository at `destination`."""
    from aet.server.repository import latest_version, scan_repository

    found = latest_version(scan_repository(repository), model)
    if found is None:
        sys.exit(
            f"--repository {repository}: no usable version of model {model!r} "
            f"(export one with `aet export`)"
        )
    shutil.copytree(found.path, destination / model / str(found.version))


def untrained_encoder(
    destination: Path,
    name: str,
    hidden_sizes: tuple[int, ...],
    code_size: int,
    image_shape: tuple[int, int, int],
    raw_max: float,
    seed: int = 0,
) -> None:
    """Export an untrained MLP encoder with our own model and exporter (random weights cost
    the same to run as trained ones) as version 1 of `name`, with a parity-checked card."""
    import numpy as np
    import torch

    from aet.server.repository import InputSpec, ModelCard, OutputSpec, write_version
    from aet.training.export import (
        ExportedEncoder,
        Scale,
        library_versions,
        max_parity_diffs,
        onnx_session,
        to_onnx,
    )
    from aet.training.models import ModelConfig, build_autoencoder

    torch.manual_seed(seed)
    config = ModelConfig(hidden_sizes=hidden_sizes, code_size=code_size)
    autoencoder = build_autoencoder(config, image_shape)
    encoder = ExportedEncoder(autoencoder, Scale(raw_max), with_score=False).eval()
    onnx_bytes = to_onnx(encoder, torch.zeros(2, *image_shape), opset=20).SerializeToString()
    pixels = np.random.default_rng(seed).uniform(0, raw_max, (64, *image_shape))
    diffs = max_parity_diffs(onnx_session(onnx_bytes), encoder, pixels.astype(np.float32))
    parity = diffs["embedding"]
    card = ModelCard(
        name=name,
        version=1,
        architecture="mlp",
        hyperparameters=config.to_dict(),
        input=InputSpec("pixels", image_shape, "float32", (0.0, raw_max)),
        output=OutputSpec("embedding", "float32", code_size),
        preprocessing=[f"divide by {raw_max:g}", "flatten"],
        dataset={"name": "none (untrained, for benchmarking)"},
        metrics={},
        opset=20,
        sha256="0" * 64,
        parity_max_abs_diff=parity,
        parity_samples=len(pixels),
        library_versions=library_versions(),
        created=datetime.now(UTC).isoformat(),
    )
    write_version(destination, name, onnx_bytes, card)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A server started in its own session; `stop()` ends it and everything it started."""

    def __init__(
        self,
        command: list[str],
        name: str,
        ready_marker: str,
        ready_timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        give_up = time.monotonic() + ready_timeout
        output = []
        while time.monotonic() < give_up:
            line = self.process.stdout.readline()
            if not line:
                break
            output.append(line)
            if ready_marker in line:
                return
        self.stop()
        raise RuntimeError(
            f"{name} did not start within {ready_timeout:.0f} s:\n" + "".join(output[-20:])
        )

    def stop(self, grace: float = 20.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process.stdout.close()


def perf_analyzer_command() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary of the tritonclient wheel and the environment it needs."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    missing = [str(p) for p in (binary, cudart / "libcudart.so.12") if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: see the setup in this script's docstring")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(cudart), env.get("LD_LIBRARY_PATH", "")])
    )
    return binary, env


def measure(
    binary: Path,
    env: dict[str, str],
    server: str,
    port: int,
    model: str,
    batch_size: int,
    concurrency: int,
    window_ms: int,
    timeout: float,
    workdir: Path,
) -> Measurement | None:
    """One perf_analyzer run at fixed batch size and concurrency; None if it failed."""
    results = workdir / f"{server}-{model}-{batch_size}-{concurrency}.csv"
    command = [
        str(binary),
        "-m",
        model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        "grpc",
        "-b",
        str(batch_size),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--input-data",
        "zero",
        "--measurement-interval",
        str(window_ms),
        "--stability-percentage",
        "50",
        "--max-trials",
        "10",
        "-f",
        str(results),
    ]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {server} {model} b{batch_size} c{concurrency}: timed out after {timeout:.0f} s")
        return None
    if done.returncode != 0 or not results.exists():
        print(
            f"  {server} {model} b{batch_size} c{concurrency}: perf_analyzer failed: "
            f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}"
        )
        return None
    with results.open() as handle:
        row = next(csv.DictReader(handle))
    return Measurement(
        server,
        model,
        batch_size,
        concurrency,
        rows_per_second=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1e3,
        p99_ms=float(row["p99 latency"]) / 1e3,
    )


def side_by_side(measurements: list[Measurement]) -> str:
    """A markdown table: one line per (model, batch, concurrency), servers side by side."""
    by_key = {(m.model, m.batch_size, m.concurrency, m.server): m for m in measurements}
    keys = sorted({(m.model, m.batch_size, m.concurrency) for m in measurements})
    lines = [
        "| model | batch | conc. | ours rows/s | p50 / p99 ms | triton rows/s | p50 / p99 ms"
        " | ours / triton | bare rows/s |",
        "|" + " --- |" * 9,
    ]

    def cells(server, key):
        m = by_key.get((*key, server))
        return (
            ("-", "-")
            if m is None
            else (f"{m.rows_per_second:,.0f}", f"{m.p50_ms:.2f} / {m.p99_ms:.2f}")
        )

    for key in keys:
        ours, triton = by_key.get((*key, "ours")), by_key.get((*key, "triton"))
        ratio = f"{ours.rows_per_second / triton.rows_per_second:.1f}x" if ours and triton else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {' | '.join(cells('ours', key))} | "
            f"{' | '.join(cells('triton', key))} | {ratio} | {cells('bare', key)[0]} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pytriton-python",
        type=Path,
        required=True,
        help="interpreter of a virtualenv with nvidia-pytriton and onnxruntime",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("exported"),
        help="model repository holding the shipped encoder",
    )
    parser.add_argument("--model", default="digits", help="the shipped encoder's name")
    parser.add_argument(
        "--untrained-digits",
        action="store_true",
        help="instead of the shipped encoder, an untrained MLP of its default "
        "shape (64-256-64-8), for machines without exported/",
    )
    parser.add_argument(
        "--no-large", action="store_true", help="skip the 784-1000-500-250-32 encoder"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads, the same for both servers",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="longest wait for a batch to fill, the same for both servers",
    )
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer window")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=1200,
        help="stop measuring after this many seconds and report what ran",
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args()
    started = time.monotonic()
    binary, env = perf_analyzer_command()
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="aet-peers-") as scratch:
        scratch = Path(scratch)
        repository = scratch / "repository"
        if args.untrained_digits:
            untrained_encoder(repository, args.model, (256, 64), 8, (1, 8, 8), 16.0)
        else:
            shipped_encoder(args.repository, args.model, repository)
        models = [args.model]
        if not args.no_large:
            untrained_encoder(repository, LARGE_MODEL, (1000, 500, 250), 32, (1, 28, 28), 255.0)
            models.append(LARGE_MODEL)
        for model in models:
            model_repository = scratch / f"only-{model}"
            shutil.copytree(repository / model, model_repository / model)
            (onnx_path,) = (model_repository / model).glob("*/model.onnx")
            for server in ("ours", "bare", "triton"):
                batch_sizes = [1] if server == "bare" else args.batch_sizes
                port = free_port()
                if server == "triton":
                    command = [
                        str(args.pytriton_python),
                        str(HERE / "pytriton_server.py"),
                        "--onnx",
                        str(onnx_path),
                        "--name",
                        model,
                        "--grpc-port",
                        str(port),
                        "--http-port",
                        str(free_port()),
                        "--threads",
                        str(args.threads),
                        "--max-queue-delay-us",
                        str(args.max_queue_delay_us),
                    ]
                else:
                    command = [
                        sys.executable,
                        "-m",
                        "aet.server",
                        "serve",
                        "--repository",
                        str(model_repository),
                        "--port",
                        str(port),
                        "--intra-op-threads",
                        str(args.threads),
                        "--inter-op-threads",
                        "1",
                        "--max-batch-size",
                        "256",
                        "--max-queue-delay-ms",
                        str(args.max_queue_delay_us / 1e3),
                        "--grace-period",
                        "5",
                    ]
                    command += ["--no-dynamic-batching"] if server == "bare" else []
                ready_marker = "READY" if server == "triton" else '"event": "server_ready"'
                print(f"{server}: {model} on port {port}", flush=True)
                process = ServerProcess(command, server, ready_marker, ready_timeout=180)
                try:
                    for batch_size in batch_sizes:
                        for concurrency in args.concurrency:
                            remaining = args.budget_s - (time.monotonic() - started)
                            if remaining < 10:
                                break
                            result = measure(
                                binary,
                                env,
                                server,
                                port,
                                model,
                                batch_size,
                                concurrency,
                                args.window_ms,
                                min(remaining, 180),
                                scratch,
                            )
                            if result is not None:
                                measurements.append(result)
                                print(
                                    f"  b{batch_size} c{concurrency}: "
                                    f"{result.rows_per_second:,.0f} rows/s, p50 "
                                    f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms",
                                    flush=True,
                                )
                finally:
                    process.stop()
    table = side_by_side(measurements)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "cpu_count": os.cpu_count(),
                "seconds": round(time.monotonic() - started, 1),
                "measurements": [dataclasses.asdict(m) for m in measurements],
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
