"""Our server against Triton (PyTriton 0.7) on the same ONNX encoders, driven by perf_analyzer.

For each encoder (the shipped one from the model repository, or with `--untrained-digits` an
untrained 64-256-64-8 MLP of the same shape, and an untrained 784-1000-500-250-32 MLP, both
built with our own model and exporter), this starts our server, the same server with dynamic
batching off (the "bare" baseline, batch 1 only) and PyTriton serving the same model.onnx
through onnxruntime behind Triton's dynamic batcher, and runs perf_analyzer over gRPC at each
batch size and concurrency; our server is also driven over its KServe v2 REST port
(`perf_analyzer -i http`, binary tensors: "ours-http", the same process as "ours"). The servers
run side by side and take turns at each point, so that other load on the machine falls on all of
them alike. It prints rows/s and client p50/p99 side by side and writes them to
`bench/results/peers.json`. Every server is started and stopped here; every perf_analyzer run
and the whole script are bounded in time. The load average and the library versions are printed
and saved beside the table.

Setup: `make install` brings perf_analyzer (tritonclient's wheel) into the project's
environment. PyTriton pins numpy < 2, which the project's environment does not take, so it lives
in its own virtualenv:

    python3.11 -m venv /tmp/aet-peers
    /tmp/aet-peers/bin/pip install 'nvidia-pytriton==0.7.*' onnxruntime

    python bench/peers/compare_triton.py --pytriton-python /tmp/aet-peers/bin/python
    python bench/peers/compare_triton.py --quick     # seconds: tiny encoder, short windows

Without a usable `--pytriton-python` only our server is measured, and the output says so.

perf_analyzer sends zeros (`--input-data zero`): its default random bytes hold NaN/Inf, which
our server rejects as INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aet.clients.server_process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
LARGE_MODEL = "mlp-1000-500-250-32"
PYTRITON_CHECK = (
    "import pytriton, onnxruntime; from importlib import metadata; "
    "print(metadata.version('nvidia-pytriton'))"
)


@dataclass(frozen=True)
class Measurement:
    """One perf_analyzer run: client-side throughput and latency percentiles."""

    server: str  # "ours", "ours-http" (ours over HTTP), "bare" (ours unbatched) or "triton"
    model: str
    batch_size: int
    concurrency: int
    rows_per_second: float
    p50_ms: float
    p99_ms: float


def shipped_encoder(repository: Path, model: str, destination: Path) -> None:
    """Copy the latest usable version of `model` into the repository at `destination`."""
    from aet.repository import latest_version, scan_repository

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

    from aet.repository import InputSpec, ModelCard, OutputSpec, write_version
    from aet.training.export import (
        ExportedEncoder,
        Scale,
        library_versions,
        max_parity_diffs,
        onnx_opset,
        onnx_session,
        to_onnx,
    )
    from aet.training.models import ModelConfig, build_autoencoder

    torch.manual_seed(seed)
    config = ModelConfig(hidden_sizes=hidden_sizes, code_size=code_size)
    autoencoder = build_autoencoder(config, image_shape)
    encoder = ExportedEncoder(autoencoder, Scale(raw_max), with_score=False).eval()
    graph = to_onnx(encoder, torch.zeros(2, *image_shape), opset=20)
    onnx_bytes = graph.SerializeToString()
    pixels = np.random.default_rng(seed).uniform(0, raw_max, (64, *image_shape))
    diffs = max_parity_diffs(onnx_session(onnx_bytes), encoder, pixels.astype(np.float32))
    parity = diffs["embedding"]
    card = ModelCard.draft(
        name,
        "mlp",
        InputSpec("pixels", image_shape, "float32", (0.0, raw_max)),
        OutputSpec("embedding", "float32", code_size),
        hyperparameters=config.to_dict(),
        preprocessing=[f"divide by {raw_max:g}", "flatten"],
        dataset={"name": "none (untrained, for benchmarking)"},
        opset=onnx_opset(graph),
        parity_max_abs_diff=parity,
        parity_samples=len(pixels),
        library_versions=library_versions(),
    )
    write_version(destination, name, onnx_bytes, card)


class PyTritonProcess:
    """pytriton_server.py in its own session; `stop()` ends it and the Triton it started."""

    def __init__(self, command: list[str], ready_timeout: float) -> None:
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        give_up = time.monotonic() + ready_timeout
        output = []
        while time.monotonic() < give_up:
            line = self.process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.strip() == "READY":
                return
        self.stop()
        raise RuntimeError(
            f"PyTriton did not start within {ready_timeout:.0f} s:\n" + "".join(output[-20:])
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


def pytriton_version(python: Path | None) -> tuple[str | None, str]:
    """(nvidia-pytriton's version, "") if `python` can serve with PyTriton, else (None, why)."""
    if python is None:
        return None, "no --pytriton-python given"
    try:
        check = subprocess.run(
            [str(python), "-c", PYTRITON_CHECK], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"--pytriton-python {python}: {exc}"
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"--pytriton-python {python} cannot import pytriton and onnxruntime: {last}"
    return check.stdout.strip(), ""


def perf_analyzer_command() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary of the tritonclient wheel and the environment it needs."""
    try:
        client = metadata.distribution("tritonclient")
        cudart = metadata.distribution("nvidia-cuda-runtime-cu12").locate_file(
            "nvidia/cuda_runtime/lib"
        )
    except metadata.PackageNotFoundError as exc:
        sys.exit(f"{exc.name} is not installed: run `make install` (see this script's docstring)")
    binary = next(
        (
            Path(client.locate_file(f)).resolve()
            for f in client.files or []
            if f.name == "perf_analyzer"
        ),
        None,
    )
    missing = [
        str(p)
        for p in (binary or "perf_analyzer (tritonclient wheel)", Path(cudart) / "libcudart.so.12")
        if not Path(p).exists()
    ]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `make install` (see this script's docstring)")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(cudart), env.get("LD_LIBRARY_PATH", "")])
    )
    return binary, env


def versions(pytriton: str | None) -> dict[str, str]:
    """The versions that decide the figures: Python, our stack, the load generator, PyTriton."""
    found = {"python": platform.python_version()}
    for name in ("ae-transfer", "grpcio", "protobuf", "numpy", "tritonclient"):
        found[name] = metadata.version(name)
    try:
        found["onnxruntime"] = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:  # onnxruntime ships as onnxruntime-gpu on Linux
        found["onnxruntime"] = metadata.version("onnxruntime-gpu")
    found["nvidia-pytriton"] = pytriton or "not used"
    return found


def measure(
    binary: Path,
    env: dict[str, str],
    server: str,
    port: int,
    model: str,
    batch_size: int,
    concurrency: int,
    window_ms: int,
    max_trials: int,
    stability_percent: int,
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
        "http" if server.endswith("-http") else "grpc",
        "-b",
        str(batch_size),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--input-data",
        "zero",
        "--measurement-interval",
        str(window_ms),
        "--stability-percentage",
        str(stability_percent),
        "--max-trials",
        str(max_trials),
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
        "| model | batch | conc. | ours rows/s | p50 / p99 ms | ours HTTP rows/s | p50 / p99 ms"
        " | HTTP / gRPC | triton rows/s | p50 / p99 ms | ours / triton | bare rows/s"
        " | ours / bare |",
        "|" + " --- |" * 13,
    ]

    def cells(server, key):
        m = by_key.get((*key, server))
        return (
            ("-", "-")
            if m is None
            else (f"{m.rows_per_second:,.0f}", f"{m.p50_ms:.2f} / {m.p99_ms:.2f}")
        )

    def ratio(key, server, other):
        ours, theirs = by_key.get((*key, server)), by_key.get((*key, other))
        return f"{ours.rows_per_second / theirs.rows_per_second:.2f}x" if ours and theirs else "-"

    for key in keys:
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {' | '.join(cells('ours', key))} | "
            f"{' | '.join(cells('ours-http', key))} | {ratio(key, 'ours-http', 'ours')} | "
            f"{' | '.join(cells('triton', key))} | {ratio(key, 'ours', 'triton')} | "
            f"{cells('bare', key)[0]} | {ratio(key, 'ours', 'bare')} |"
        )
    return "\n".join(lines)


def server_command(
    server: str, model: str, model_repository: Path, port: int, args: argparse.Namespace
) -> list[str]:
    """The command line that serves `model` on `port`: PyTriton or our flags for `server`
    ("ours" serves HTTP too, on `args.http_port`)."""
    if server == "triton":
        (onnx_path,) = (model_repository / model).glob("*/model.onnx")
        return [
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
    flags = [
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
    if server == "ours":
        flags += ["--http-port", str(args.http_port)]
    return flags + (["--no-dynamic-batching"] if server == "bare" else [])


def start(
    server: str, model: str, model_repository: Path, args: argparse.Namespace
) -> tuple[PyTritonProcess | ServerProcess, int]:
    """Start `server` ("ours", "bare" or "triton") on `model`; the process and its gRPC port
    ("ours" also serves HTTP, on `args.http_port`)."""
    if server == "triton":
        port = free_port()
        command = server_command(server, model, model_repository, port, args)
        return PyTritonProcess(command, ready_timeout=180), port
    if server == "ours":
        args.http_port = free_port()
    flags = server_command(server, model, model_repository, 0, args)
    process = ServerProcess(model_repository, args.scratch / f"{server}-{model}.log", *flags)
    try:
        process.wait_until_serving(model)
    except Exception:
        process.stop()
        raise
    return process, process.port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pytriton-python",
        type=Path,
        default=None,
        help="interpreter of a virtualenv with nvidia-pytriton and onnxruntime "
        "(default: none, our server only)",
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
        "--max-trials", type=int, default=10, help="perf_analyzer windows before it gives up"
    )
    parser.add_argument(
        "--stability-percent",
        type=int,
        default=50,
        help="perf_analyzer's --stability-percentage: how far 3 windows may differ",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=1200,
        help="stop measuring after this many seconds and report what ran",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: the untrained digits encoder only, batch 1 and 8, "
        "concurrency 1 and 4, 200 ms windows, any 3 of at most 6 taken as stable",
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.untrained_digits = args.no_large = True
        args.batch_sizes, args.concurrency = [1, 8], [1, 4]
        args.window_ms, args.max_trials, args.stability_percent = 200, 6, 1000
        args.budget_s = min(args.budget_s, 120)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    binary, env = perf_analyzer_command()
    pytriton, why_not = pytriton_version(args.pytriton_python)
    servers = ("ours", "ours-http", "bare") + (("triton",) if pytriton else ())
    if not pytriton:
        print(f"PyTriton unavailable ({why_not}): measuring our server only", flush=True)
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="aet-peers-") as scratch:
        scratch = args.scratch = Path(scratch)
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
            processes: dict[str, PyTritonProcess | ServerProcess] = {}
            ports: dict[str, int] = {}
            try:
                for server in servers:
                    if server == "ours-http":  # the same process as "ours", on its HTTP port
                        ports[server] = args.http_port
                        continue
                    processes[server], ports[server] = start(server, model, model_repository, args)
                    print(f"{server}: {model} on port {ports[server]}", flush=True)
                points = [(b, c) for b in args.batch_sizes for c in args.concurrency]
                for index, (batch_size, concurrency) in enumerate(points):
                    # The servers take turns at each point, in an order that rotates, so that
                    # other load on the machine falls on all of them alike.
                    turn = index % len(servers)
                    for server in servers[turn:] + servers[:turn]:
                        if server == "bare" and batch_size != 1:
                            continue
                        remaining = args.budget_s - (time.monotonic() - started)
                        if remaining < 10:
                            break
                        result = measure(
                            binary,
                            env,
                            server,
                            ports[server],
                            model,
                            batch_size,
                            concurrency,
                            args.window_ms,
                            args.max_trials,
                            args.stability_percent,
                            min(remaining, 180),
                            scratch,
                        )
                        if result is not None:
                            measurements.append(result)
                            print(
                                f"  {server} b{batch_size} c{concurrency}: "
                                f"{result.rows_per_second:,.0f} rows/s, p50 "
                                f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms",
                                flush=True,
                            )
            finally:
                for process in processes.values():
                    process.stop()
    load_at_end = os.getloadavg()
    found = versions(pytriton)
    table = side_by_side(measurements)
    print(table)
    print(
        f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_at_start)} at start, "
        f"{', '.join(f'{x:.2f}' for x in load_at_end)} at end; {os.cpu_count()} CPUs"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if not pytriton:
        print(f"PyTriton unavailable ({why_not}): the table compares our server only")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "cpu_count": os.cpu_count(),
                "load_average_at_start": load_at_start,
                "load_average_at_end": load_at_end,
                "versions": found,
                "pytriton_unavailable": why_not or None,
                "seconds": round(time.monotonic() - started, 1),
                "measurements": [dataclasses.asdict(m) for m in measurements],
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )
    partial.replace(args.output)
    print(f"written {args.output}")
    return 0 if measurements else 1


if __name__ == "__main__":
    sys.exit(main())
