"""Extraction throughput of each `aet embed` backend side by side, and the probe tables.

    python bench/extract.py [--repository exported] [--mnist-path ../shared/data/mnist]

Embeds every row of the MNIST test set (the t10k files: 10,000 images) through the local
onnxruntime backend, a child `aet serve` over gRPC, and Ray Data with `--workers` actors,
`--repeats` times each, and reports rows per second of the embedding phase (median and best)
beside the one-off start-up cost of each backend. Then runs `aet probe` on the digits and MNIST
embeddings. Writes `bench/results/extract.md` and `.json`.

    python bench/extract.py --quick    # a smoke run: digits only, one run each, writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aet.clients.backends import LocalBackend, RayBackend, ServerBackend
from aet.clients.client import EmbeddingClient
from aet.clients.demo import ServerProcess
from aet.clients.extract import EmbedConfig, extract, read_embeddings
from aet.clients.probe import ProbeConfig, dataset_of, probe
from aet.training.data import load_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def time_backend(name: str, open_backend, job: EmbedConfig, dataset, repeats: int) -> dict:
    """Start a backend once, then run the extraction job `repeats` times on it."""
    started = time.perf_counter()
    backend = open_backend()
    startup = time.perf_counter() - started
    rates = []
    with backend:
        for _ in range(repeats):
            summary = extract(job, backend, dataset)
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
    model_dir = args.repository / args.mnist_model
    data, path = ("digits", None) if args.quick else ("mnist-idx", args.mnist_path)
    dataset = load_dataset(data, path)
    job = dict(
        dataset=data,
        data_path=path,
        batch_size=args.batch_size,
        output=scratch / "throughput.npz",
        overwrite=True,
        progress=False,
    )
    results = [
        time_backend(
            "local",
            lambda: LocalBackend(model_dir),
            EmbedConfig(local=model_dir, **job),
            dataset,
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
                dataset,
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
            dataset,
            args.repeats,
        )
    )
    return results


def probe_tables(args: argparse.Namespace, scratch: Path) -> dict[str, str]:
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
                    dataset=data, data_path=path, local=model_dir, output=output, progress=False
                ),
                backend,
            )
        table = read_embeddings(output)
        results = probe(
            table,
            dataset_of(table, str(output)),
            ProbeConfig(embeddings=output, output=scratch / f"probe-{data}"),
        )
        tables[data] = results.markdown()
        print(tables[data], flush=True)
    return tables


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
        "--quick",
        action="store_true",
        help="a smoke run: the digits model and data set in place of MNIST, one run per "
        "backend, one Ray actor; prints, writes nothing",
    )
    args = parser.parse_args()
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
    RESULTS.mkdir(exist_ok=True)
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
    (RESULTS / "extract.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "extract.json").write_text(
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
    print(f"wrote {RESULTS / 'extract.md'} and {RESULTS / 'extract.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
