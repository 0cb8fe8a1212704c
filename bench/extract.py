"""Extraction throughput of each `aet embed` backend side by side, the probe tables, and how
extraction scales with the number of rows.

    python bench/extract.py [--repository exported] [--mnist-path ../shared/data/mnist]
    python bench/extract.py --rows 100000,1000000 [--workers 2] [--linear-dim 256]
        [--backends local] [--format .npz]
    python bench/extract.py --quick

Without `--rows`: embeds every row of the MNIST test set (the t10k files: 10,000 images)
through the local onnxruntime backend, a child `aet serve` over gRPC, and Ray Data with
`--workers` actors, `--repeats` times each, and reports rows per second of the embedding phase
(median and best) beside the one-off start-up cost of each backend. Then runs `aet probe` on
the digits and MNIST embeddings. Writes `bench/results/extract.md` and `.json`.

With `--rows`: for each row count, tiles the MNIST test set into uncompressed IDX files of that
many rows (read memory-mapped, block by block) and runs one `aet embed` job per backend, local
and Ray, each in a child process: rows per second of the embedding phase, seconds of the whole
job, and the peak resident memory of the job's own process (the driver; Ray's workers are
other processes). The local job's peak at the smallest and the largest row count is printed
side by side with the size of the embeddings it wrote (one row count: the local job runs at a
quarter of it too): the job streams its shards into the output, so its memory stays flat.
`--linear-dim D` embeds with a linear 784 -> D encoder written on the fly in place of a
trained MNIST model (D = 256: codes as wide as a large conv encoder's). Writes
`extract-scale.md` and `.json` (a test runs it on 3,000 rows).

`--quick` is a smoke run of the first part: the digits model and data set in place of MNIST,
one run per backend, one Ray actor, the probes at 100 and all labels (their MLP head 200
steps); it prints and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aet.clients.backends import LocalBackend, RayBackend, ServerBackend
from aet.clients.client import EmbeddingClient
from aet.clients.embeddings import read_embeddings
from aet.clients.extract import EmbedConfig, extract
from aet.clients.rows import plan_rows
from aet.training.data import default_mnist_dir, find_idx_folder, idx_file, read_idx
from aet.training.dataspec import DataSpec

RESULTS = Path(__file__).resolve().parent / "results"


def time_backend(name: str, open_backend, job: EmbedConfig, plan, repeats: int) -> dict:
    """Start a backend once, then run the extraction job `repeats` times on it."""
    started = time.perf_counter()
    backend = open_backend()
    startup = time.perf_counter() - started
    rates = []
    with backend:
        for _ in range(repeats):
            summary = extract(job, backend, plan)
            rates.append(summary.rows_per_second)
    print(
        f"{name:>7}: start-up {startup:6.2f} s, {statistics.median(rates):10,.0f} rows/s "
        f"median of {repeats} (best {max(rates):,.0f})",
        flush=True,
    )
    return {
        "backend": backend.label,
        "startup_seconds": startup,
        "rows": summary.rows,
        "rows_per_second": rates,
        "median_rows_per_second": statistics.median(rates),
    }


def throughput(args: argparse.Namespace, scratch: Path) -> list[dict]:
    from aet.clients.server_process import ServerProcess

    model_dir = args.repository / args.mnist_model
    data, path = ("digits", None) if args.quick else ("mnist-idx", args.mnist_path)
    plan = plan_rows(DataSpec(data, path))
    job = dict(
        data=DataSpec(data, path),
        batch_size=args.batch_size,
        output=scratch / "throughput.parquet",
        overwrite=True,
        progress=False,
    )
    results = [
        time_backend(
            "local",
            lambda: LocalBackend(model_dir),
            EmbedConfig(local=model_dir, **job),
            plan,
            args.repeats,
        )
    ]
    server = ServerProcess(args.repository, scratch / "server.log")
    try:
        started = time.perf_counter()
        server.wait_until_serving(args.mnist_model)
        serve_startup = time.perf_counter() - started
        results.append(
            time_backend(
                "server",
                lambda: ServerBackend(EmbeddingClient(server.target), args.mnist_model),
                EmbedConfig(server=server.target, model=args.mnist_model, **job),
                plan,
                args.repeats,
            )
        )
        results[-1]["startup_seconds"] += serve_startup
    finally:
        server.stop()
    results.append(
        time_backend(
            "ray",
            lambda: RayBackend(model_dir, args.workers),
            EmbedConfig(ray=model_dir, workers=args.workers, **job),
            plan,
            args.repeats,
        )
    )
    return results


def probe_tables(args: argparse.Namespace, scratch: Path) -> dict[str, str]:
    from aet.clients.probe import ProbeConfig, dataset_of, probe  # scikit-learn: only here

    quick_probe = {"label_counts": [100], "steps": 200} if args.quick else {}
    tables = {}
    for data, path, model in (
        ("digits", None, args.digits_model),
        *([] if args.quick else [("mnist-idx", args.mnist_path, args.mnist_model)]),
    ):
        model_dir = args.repository / model
        output = scratch / f"{data}.npz"
        with LocalBackend(model_dir) as backend:
            extract(
                EmbedConfig(
                    data=DataSpec(data, path), local=model_dir, output=output, progress=False
                ),
                backend,
            )
        table = read_embeddings(output)
        results = probe(
            table,
            dataset_of(table, str(output)),
            ProbeConfig(embeddings=output, output=scratch / f"probe-{data}", **quick_probe),
        )
        tables[data] = results.markdown()
        print(tables[data], flush=True)
    return tables


def tile_mnist(mnist_path: Path | None, rows: int, folder: Path) -> Path:
    """Uncompressed t10k IDX files of `rows` rows: the MNIST test set repeated; `folder`."""
    source = find_idx_folder(default_mnist_dir() if mnist_path is None else mnist_path)
    images, labels = (read_idx(idx_file(source, "t10k", kind)) for kind in ("images", "labels"))
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array, magic in (("images", images, 3), ("labels", labels, 1)):
        shape = (rows, *array.shape[1:])
        header = bytes([0, 0, 8, magic]) + b"".join(d.to_bytes(4, "big") for d in shape)
        with open(folder / f"t10k-{kind}-idx{magic}-ubyte", "wb") as out:
            out.write(header)
            for start in range(0, rows, len(array)):  # a copy at a time: no N-row array here
                out.write(array[: min(len(array), rows - start)].tobytes())
    return folder


def linear_mnist_encoder(root: Path, dim: int) -> None:
    """`root/mnist/1`: flatten(pixels / 255) @ W (784 x `dim`, seed 0), a real ONNX graph for
    28x28 images that needs no training."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from aet.repository import InputSpec, ModelCard, OutputSpec, write_version

    shape = (1, 28, 28)
    weights = np.random.default_rng(0).standard_normal((784, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["pixels", "raw_max"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
        ],
        "linear_mnist_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [
            numpy_helper.from_array(np.array(255.0, np.float32), "raw_max"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    card = ModelCard.draft(
        "mnist",
        "linear",
        InputSpec("pixels", shape, "float32", (0.0, 255.0)),
        OutputSpec("embedding", "float32", dim),
        preprocessing=["divide by 255", "flatten"],
        dataset={"name": "mnist-idx"},
        opset=17,
        library_versions={"onnx": onnx.__version__},
    )
    write_version(root, "mnist", model.SerializeToString(), card)


def measure_job(args: argparse.Namespace) -> int:
    """In a child process: one `aet embed` job; prints its figures as one JSON line."""
    job = dict(
        data=DataSpec("mnist-idx", args.measure_path),
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        output=args.measure_output,
        progress=False,
    )
    model_dir = args.repository / args.mnist_model
    started = time.perf_counter()
    if args.measure_job == "local":
        backend, config = LocalBackend(model_dir), EmbedConfig(local=model_dir, **job)
    else:
        backend = RayBackend(model_dir, args.workers)
        config = EmbedConfig(ray=model_dir, workers=args.workers, **job)
    with backend:
        summary = extract(config, backend)
    seconds = time.perf_counter() - started
    # Linux reports kilobytes; the job's own process, not its Ray workers.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = read_embeddings(summary.output).ids  # after the peak is read: checks every row once
    if not np.array_equal(ids, np.arange(summary.rows)):
        raise SystemExit(f"{summary.output}: rows missing or repeated")
    print(
        json.dumps(
            {
                "backend": backend.label,
                "rows": summary.rows,
                "rows_per_second": summary.rows_per_second,
                "job_seconds": seconds,
                "peak_driver_rss_mb": peak_mb,
                "embeddings_mb": summary.rows * backend.model.embedding_dim * 4 / 2**20,
            }
        )
    )
    return 0


def scale(args: argparse.Namespace, scratch: Path) -> list[dict]:
    """One local and (unless `--backends local`) one Ray job per row count, each in its own
    process; with one row count, a local job at a quarter of it too, for `local_memory`."""
    if args.linear_dim:
        args.repository, args.mnist_model = scratch / "exported", "mnist"
        linear_mnist_encoder(args.repository, args.linear_dim)
    counts = args.rows if len(args.rows) > 1 else [max(1, args.rows[0] // 4), *args.rows]
    results = []
    for rows in counts:
        folder = tile_mnist(args.mnist_path, rows, scratch / f"mnist-{rows}")
        for backend in args.backends.split(",") if rows in args.rows else ["local"]:
            output = scratch / f"{backend}-{rows}{'.parquet' if backend == 'ray' else args.format}"
            command = [
                sys.executable,
                __file__,
                f"--measure-job={backend}",
                f"--measure-path={folder}",
                f"--measure-output={output}",
                f"--repository={args.repository}",
                f"--mnist-model={args.mnist_model}",
                f"--workers={args.workers}",
                f"--batch-size={args.batch_size}",
                f"--shard-size={args.shard_size}",
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{backend} job on {rows} rows failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            with open("/proc/loadavg") as load:
                result["loadavg"] = " ".join(load.read().split()[:3])
            results.append(result)
            print(
                f"{rows:>9,} rows {backend:>5}: {result['rows_per_second']:10,.0f} rows/s, "
                f"job {result['job_seconds']:7.1f} s, peak driver RSS "
                f"{result['peak_driver_rss_mb']:7.0f} MB (load {result['loadavg']})",
                flush=True,
            )
            subprocess.run(["rm", "-rf", str(output), f"{output}.shards"], check=True)
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    return results


def local_memory(results: list[dict]) -> dict:
    """The local job's peak RSS at its smallest and largest row count, beside the size of the
    embeddings it wrote: flat when the job streams its shards into the output."""
    local = [r for r in results if r["backend"].startswith("local")]
    small, large = min(local, key=lambda r: r["rows"]), max(local, key=lambda r: r["rows"])
    return {
        "rows": [small["rows"], large["rows"]],
        "peak_rss_mb": [small["peak_driver_rss_mb"], large["peak_driver_rss_mb"]],
        "embeddings_mb": [small["embeddings_mb"], large["embeddings_mb"]],
    }


def memory_line(memory: dict) -> str:
    (small, large), (rss_small, rss_large) = memory["rows"], memory["peak_rss_mb"]
    return (
        f"local job peak RSS: {rss_small:,.0f} MB at {small:,} rows, {rss_large:,.0f} MB at "
        f"{large:,} rows ({rss_large - rss_small:+,.0f} MB; the embeddings written grew by "
        f"{memory['embeddings_mb'][1] - memory['embeddings_mb'][0]:,.0f} MB)"
    )


def scale_report(args: argparse.Namespace, results: list[dict]) -> None:
    memory = local_memory(results)
    print(memory_line(memory), flush=True)
    lines = [
        "# Extraction at scale: the MNIST test set tiled, read memory-mapped",
        "",
        "| rows | backend | rows/s (embedding) | job seconds | peak driver RSS (MB) | "
        "load average |",
        "|---:|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['rows']:,} | {r['backend']} | {r['rows_per_second']:,.0f} | "
        f"{r['job_seconds']:.1f} | {r['peak_driver_rss_mb']:.0f} | {r['loadavg']} |"
        for r in results
    ]
    lines += [
        "",
        f"batch size {args.batch_size}, {args.shard_size} rows per shard or block, Ray with "
        f"{args.workers} actors (+1 CPU for reading and writing), one job per process; "
        f"local output {args.format}"
        + (f", a linear 784-{args.linear_dim} encoder" if args.linear_dim else ""),
        "",
        memory_line(memory),
        "",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "extract-scale.md").write_text("\n".join(lines))
    (args.results / "extract-scale.json").write_text(
        json.dumps(
            {
                "scale": results,
                "local_memory": memory,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.results / 'extract-scale.md'} and {args.results / 'extract-scale.json'}")


def row_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"expected positive row counts, got {text}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("exported"),
        help="model repository (default: exported)",
    )
    parser.add_argument("--mnist-model", default="mnist", help="MNIST model name (default: mnist)")
    parser.add_argument(
        "--digits-model", default="digits", help="digits model name (default: digits)"
    )
    parser.add_argument(
        "--mnist-path",
        type=Path,
        default=None,
        help="folder of MNIST IDX files (default: $AET_MNIST_DIR or ../shared/data/mnist)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (default: 2)")
    parser.add_argument(
        "--batch-size", type=int, default=512, help="rows per request or run (default: 512)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="extraction runs per backend (default: 3)"
    )
    parser.add_argument(
        "--rows",
        type=row_counts,
        default=None,
        help="scale figure instead: comma-separated row counts of the tiled MNIST test set",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=16384,
        help="scale: rows per shard or block (default: 16384)",
    )
    parser.add_argument(
        "--linear-dim",
        type=int,
        default=None,
        help="scale: embed with a linear 784 -> D encoder written on the fly instead of "
        "--repository's MNIST model",
    )
    parser.add_argument(
        "--backends",
        choices=["local,ray", "local"],
        default="local,ray",
        help="scale: local,ray (default) or local",
    )
    parser.add_argument(
        "--format",
        choices=[".parquet", ".npz"],
        default=".parquet",
        help="scale: the local job's output file (default: .parquet)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: the digits model and data set in place of MNIST, one run per "
        "backend, one Ray actor; prints, writes nothing",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"report folder (default: {RESULTS})"
    )
    for hidden in ("--measure-job", "--measure-path", "--measure-output"):
        parser.add_argument(
            hidden, type=Path if hidden != "--measure-job" else str, help=argparse.SUPPRESS
        )
    args = parser.parse_args()
    if args.linear_dim is not None and args.linear_dim < 1:
        parser.error(f"--linear-dim: expected a positive width, got {args.linear_dim}")
    if args.measure_job:
        return measure_job(args)
    if args.rows:
        if not args.linear_dim and not (args.repository / args.mnist_model).is_dir():
            print(
                f"bench/extract.py: {args.repository / args.mnist_model}: no such model",
                file=sys.stderr,
            )
            return 2
        with tempfile.TemporaryDirectory(prefix="aet-bench-") as scratch:
            scale_report(args, scale(args, Path(scratch)))
        return 0
    if args.quick:
        args.mnist_model, args.repeats, args.workers = args.digits_model, 1, 1
    for model in (args.mnist_model, args.digits_model):
        if not (args.repository / model).is_dir():
            print(
                f"bench/extract.py: {args.repository / model}: no such model; train and "
                f"export it first (aet demo --pretrain, with --dataset mnist-idx for MNIST)",
                file=sys.stderr,
            )
            return 2
    with tempfile.TemporaryDirectory(prefix="aet-bench-") as scratch:
        backends = throughput(args, Path(scratch))
        tables = probe_tables(args, Path(scratch))
    if args.quick:
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Extraction throughput, MNIST test set (10,000 rows)",
        "",
        "| backend | start-up (s) | seconds per job (median) | rows/s (median) | rows/s (best) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['backend']} | {r['startup_seconds']:.2f} | "
        f"{r['rows'] / r['median_rows_per_second']:.2f} | "
        f"{r['median_rows_per_second']:,.0f} | {max(r['rows_per_second']):,.0f} |"
        for r in backends
    ]
    lines += [
        "",
        f"batch size {args.batch_size}, {args.repeats} runs per backend, Ray with "
        f"{args.workers} actors",
        "",
    ]
    lines += ["# Probe accuracy", ""] + [table for table in tables.values()]
    (args.results / "extract.md").write_text("\n".join(lines) + "\n")
    (args.results / "extract.json").write_text(
        json.dumps(
            {
                "throughput": backends,
                "probe_tables": tables,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.results / 'extract.md'} and {args.results / 'extract.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
