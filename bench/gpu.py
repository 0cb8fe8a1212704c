"""The GPU check: everything that has a CUDA path, run once on a real GPU, in one short script.

    bash bench/gpu.sh [RESULTS_DIR]                  # on a GPU machine, < 8 minutes on one H200
    python bench/gpu.py [RESULTS_DIR] --device cpu   # the same steps on CPU (reference figures)
    python bench/gpu.py --quick --device cpu         # the smoke run a test makes

Four sections, each written into RESULTS_DIR/gpu.json and gpu.md (default bench/results/):
1. env: nvidia-smi, torch's CUDA device, onnxruntime's providers after `preload_dlls()`, versions;
2. train: `aet pretrain --recipe images` on the MNIST split for --epochs epochs at fp32, bf16
   and fp16 (seconds per epoch from the time each epoch's log line appears; the fp32 run's
   probe table unless --skip-probe, the others stop after their epochs), then one epoch under
   `torchrun --nproc-per-node 1` (NCCL on CUDA); the fp32 run is exported (`aet export`,
   parity-checked) for the next two sections;
3. serve: `aet serve --device D` over the shipped digits encoder, a large MNIST-size MLP with
   random weights (bench/serve.py's) and the encoder just trained: the provider each session
   really uses (must be CUDAExecutionProvider on CUDA), served embeddings against CPU
   onnxruntime (max abs diff <= 1e-4), then rows/s, p50 and p99 at batch 1 / 64 / 256 and
   concurrency 1 / 16 / 64, with and without dynamic batching, beside in-process onnxruntime
   on the same device (with IO binding on CUDA: the limit);
4. extract: `aet embed --local --device D` on --rows rows (the MNIST test set tiled into IDX
   files), and `--ray` with one GPU actor where Ray is installed.

With `--device cuda` (the default) on a machine without an NVIDIA GPU it says so in one line
and exits 0 after checking its arguments. Exit 1 when a check failed (written down all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH)]  # bench/extract.py and bench/serve.py, imported where used:
# they pull in onnx, grpc and the data loaders, so bad arguments are refused before that cost

from aet.devices import nvidia_gpu_present  # noqa: E402

PARITY_TOLERANCE = 1e-4
PARITY_ROWS = 1000
PRECISIONS = {"cuda": ("fp32", "bf16", "fp16"), "cpu": ("fp32",)}
EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+): train ")
CLIENT_PROCESSES = 8


# -- running children -----------------------------------------------------------------------


def run_timed(command: list[str], log: Path, timeout: float) -> tuple[int, float, list[tuple]]:
    """Run `command`, its output into `log`; (exit code, seconds, [(seconds, line), ...])."""
    started = time.perf_counter()
    lines = []
    with (
        open(log, "w") as out,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as child,
    ):
        assert child.stdout is not None
        for line in child.stdout:
            lines.append((time.perf_counter() - started, line.rstrip()))
            out.write(line)
        try:
            code = child.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            child.kill()
            code = -9
    return code, time.perf_counter() - started, lines


def aet(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "aet.cli", *arguments]


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- 1. environment ---------------------------------------------------------------------------


def environment(args: argparse.Namespace, scratch: Path, failures: list[str]) -> dict:
    import onnxruntime as ort
    import torch

    info: dict = {
        "python": platform.python_version(),
        "versions": {},
        "torch_cuda_available": torch.cuda.is_available(),
    }
    for package in ("torch", "onnxruntime-gpu", "onnxruntime", "numpy", "grpcio", "protobuf"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][package] = importlib.metadata.version(package)
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,compute_cap"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    if torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
    with contextlib.redirect_stdout(None):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    info["onnxruntime_providers"] = ort.get_available_providers()
    return info


# -- 2. training ------------------------------------------------------------------------------


def pretrain_command(args: argparse.Namespace, runs: Path, name: str, epochs: int) -> list[str]:
    data = (
        ["--recipe", "digits", "--architecture", "mlp", "--dataset", "digits"]  # one stage
        if args.quick
        else ["--recipe", "images", "--dataset", "mnist-idx", "--data-path", str(args.mnist_path)]
    )
    return [
        *data,
        "--epochs",
        str(epochs),
        "--patience",
        str(epochs),
        "--device",
        args.device,
        "--runs-dir",
        str(runs),
        "--name",
        name,
        "--no-progress",
    ]


def epoch_seconds(lines: list[tuple]) -> list[float]:
    """Seconds between consecutive epoch lines, the first counted from the first log line."""
    stamps = [at for at, line in lines if EPOCH_LINE.search(line)]
    start = lines[0][0] if lines else 0.0
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]


def timed_pretrain(command: list[str], log: Path, epochs: int, probe: bool) -> dict:
    """One pretraining run: its exit code and seconds per epoch. With `probe` it runs to its
    end and the probe table is read from metrics.json; else `--stop-after-epochs` ends it after
    its epochs, checkpoint saved (the evaluation after them takes minutes and says nothing
    about the device)."""
    run = Path(command[command.index("--runs-dir") + 1]) / command[command.index("--name") + 1]
    if not probe:
        command = [*command, "--stop-after-epochs", str(epochs)]
    code, seconds, lines = run_timed(command, log, 900)
    per_epoch = epoch_seconds(lines)
    finished = (run / "metrics.json") if probe else (run / "checkpoint.pt")
    entry: dict = {"exit_code": code, "seconds": seconds}
    entry["ok"] = len(per_epoch) >= epochs and finished.exists()
    if not entry["ok"]:
        return entry | {"log_tail": tail(log)}
    entry.update(
        first_epoch_seconds=per_epoch[0],
        seconds_per_epoch=float(np.median(per_epoch[1:] or per_epoch)),
    )
    if probe:
        entry.update(logistic_probe_figures(json.loads(finished.read_text())["evaluation"]))
    return entry


def logistic_probe_figures(evaluation: dict) -> dict:
    """The logistic probe's test accuracies on the codes and on the pixels, per label budget,
    from a run's metrics.json `evaluation` (`training.evaluate.evaluate_autoencoder`)."""
    probe = evaluation["probe"]
    return {
        "probe_labels": probe["labels"],
        "logistic_probe": probe["accuracy"]["model"]["logreg"],
        "pixels_probe": probe["accuracy"]["pixels"]["logreg"],
    }


def training(args: argparse.Namespace, scratch: Path, failures: list[str]) -> dict:
    """Each precision for --epochs epochs (the fp32 run probed unless --skip-probe), one epoch
    under torchrun, and the fp32 run exported as "trained"."""
    recipe = "digits" if args.quick else "images"
    runs, result = scratch / "runs", {"recipe": recipe, "epochs": args.epochs, "runs": []}
    for precision in PRECISIONS[args.device]:
        name = f"{args.device}-{precision}"
        print(f"train: {name}, {args.epochs} epochs ...", flush=True)
        command = aet("pretrain", *pretrain_command(args, runs, name, args.epochs))
        probe = precision == "fp32" and not args.skip_probe
        entry = {"precision": precision} | timed_pretrain(
            [*command, "--precision", precision], scratch / f"{name}.log", args.epochs, probe
        )
        print(f"train: {name}: {json.dumps(entry)}", flush=True)
        if not entry["ok"]:
            failures.append(f"pretrain {name} exited {entry['exit_code']}: {entry['log_tail']}")
        result["runs"].append(entry)

    print("train: torchrun --nproc-per-node 1, one epoch ...", flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    command = [*torchrun, "-m", "aet.training", "pretrain"]
    command += pretrain_command(args, runs, f"{args.device}-torchrun", 1)
    result["torchrun"] = timed_pretrain(command, scratch / "torchrun.log", 1, probe=False)
    print(f"train: torchrun: {json.dumps(result['torchrun'])}", flush=True)
    if not result["torchrun"]["ok"]:
        failures.append(f"torchrun: {result['torchrun']['log_tail']}")

    trained = runs / f"{args.device}-fp32" / "best.pt"
    if not trained.exists():
        failures.append(f"export: {trained} missing")
    else:
        print("train: export ...", flush=True)
        log = scratch / "export.log"
        command = aet("export", "--checkpoint", str(trained), "--repository", str(args.repository))
        code, seconds, _ = run_timed(command + ["--model", "trained"], log, 600)
        result["export"] = {"exit_code": code, "seconds": seconds}
        if code != 0:
            failures.append(f"export exited {code}: {tail(log)}")
    return result


# -- 3. serving -------------------------------------------------------------------------------


def build_repository(args: argparse.Namespace) -> None:
    """The shipped digits encoder and bench/serve.py's large MLP (training adds its own)."""
    import serve as serve_bench

    shutil.copytree(ROOT / "exported" / "digits", args.repository / "digits")
    serve_bench.build_repository(args.repository)  # writes "tiny" and "large"
    shutil.rmtree(args.repository / "tiny")


def model_path(repository: Path, model: str) -> Path:
    return max((repository / model).iterdir(), key=lambda p: int(p.name)) / "model.onnx"


def sample_rows(repository: Path, model: str, rows: int) -> np.ndarray:
    """Seeded rows in the model's input range, of its dtype, from its model.json."""
    card = json.loads((model_path(repository, model).parent / "model.json").read_text())
    low, high = card["input"]["value_range"] or (0.0, 1.0)
    values = np.random.default_rng(7).uniform(low, high, (rows, *card["input"]["shape"]))
    return values.astype(card["input"]["dtype"])


def in_process_session(path: Path, device: str):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


def in_process_rate(path: Path, rows: np.ndarray, device: str, seconds: float) -> dict:
    """Back-to-back runs for `seconds`: rows/s and p50 (ms); on CUDA with IO binding, input
    and output staying on the GPU (no host copies: what the GPU itself allows)."""
    import onnxruntime as ort

    session = in_process_session(path, device)
    feed_name = session.get_inputs()[0].name
    if device == "cuda":
        binding = session.io_binding()
        binding.bind_ortvalue_input(feed_name, ort.OrtValue.ortvalue_from_numpy(rows, "cuda", 0))
        binding.bind_output("embedding", "cuda", 0)

        def call() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

    else:

        def call() -> None:
            session.run(["embedding"], {feed_name: rows})

    for _ in range(10):
        call()
    latencies, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return {
        "rows_per_s": len(rows) * len(latencies) / sum(latencies),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "providers": session.get_providers(),
    }


def served_rate(
    port: int, request, batch: int, concurrency: int, seconds: float, pool, processes: int
) -> dict:
    """`concurrency` callers in up to `processes` processes, each one call at a time."""
    import serve as serve_bench

    processes = min(concurrency, processes)
    threads = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    parts = [
        pool.submit(serve_bench.unary_clients, port, request, n, seconds, None) for n in threads
    ]
    tally = serve_bench.Tally(batch)
    for part in parts:
        tally.add(part.result())
    # Every process ran for about `seconds`; their calls add up over the longest of them.
    tally.seconds = max(part.result()["seconds"] for part in parts)
    summary = tally.summary()
    return {k: summary[k] for k in ("rows_per_s", "p50_ms", "p99_ms")}


def check_served(target: str, models: list[str], args: argparse.Namespace, failures: list) -> dict:
    """Provider and parity with CPU onnxruntime of each model on the running server."""
    from aet.clients.client import EmbeddingClient

    checks = {}
    with EmbeddingClient(target, timeout=120) as client:
        for model in models:
            provider = client.describe(model).execution_provider
            rows = sample_rows(args.repository, model, PARITY_ROWS)
            served = client.embed(rows, model)
            cpu = in_process_session(model_path(args.repository, model), "cpu")
            reference = cpu.run(["embedding"], {cpu.get_inputs()[0].name: rows})[0]
            diff = float(np.max(np.abs(served - reference)))
            checks[model] = {"provider": provider, "max_abs_diff_vs_cpu": diff}
            expected = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
            if provider != expected:
                failures.append(f"serve {model}: runs on {provider}, not {expected}")
            if diff > PARITY_TOLERANCE:
                failures.append(f"serve {model}: {diff:.2e} from CPU onnxruntime (> 1e-4)")
    return checks


def serving(args: argparse.Namespace, scratch: Path, failures: list[str]) -> dict:
    import serve as serve_bench

    from aet.clients.server_process import ServerProcess

    models = sorted(p.name for p in args.repository.iterdir())
    load_models = ["digits"] if args.quick else ["large", "digits"]
    batches, concurrencies = ((1, 64), (1, 4)) if args.quick else ((1, 64, 256), (1, 16, 64))
    result: dict = {"models": models, "grid": [], "in_process": []}
    for model in load_models:
        for batch in batches:
            rows = sample_rows(args.repository, model, batch)
            rate = in_process_rate(model_path(args.repository, model), rows, args.device, 1.0)
            result["in_process"].append({"model": model, "batch": batch, **rate})
    flags = ["--device", args.device, "--max-batch-size", "1024", "--workers", "128"]
    spawn = get_context("spawn")
    processes = 2 if args.quick else CLIENT_PROCESSES
    with ProcessPoolExecutor(processes, mp_context=spawn) as pool:
        for dynamic in (True, False):
            mode = "dynamic batching" if dynamic else "no dynamic batching"
            log = scratch / f"serve-{'dynamic' if dynamic else 'plain'}.log"
            extra = [] if dynamic else ["--no-dynamic-batching"]
            with ServerProcess(args.repository, log, *flags, *extra) as server:
                try:
                    server.wait_until_serving()
                except Exception as exc:  # the server's own log says why
                    failures.append(f"aet serve ({mode}) did not start: {exc}: {tail(log)}")
                    return result
                if dynamic:
                    print("serve: providers and parity ...", flush=True)
                    result["checks"] = check_served(server.target, models, args, failures)
                for model in load_models:
                    for batch in batches:
                        rows = sample_rows(args.repository, model, batch)
                        request = serve_bench.embedding_pb2.EmbedRequest(
                            model=model, inputs=serve_bench.encode_tensor(rows)
                        )
                        for concurrency in concurrencies:
                            print(f"serve: {mode}, {model}, batch {batch}, {concurrency} clients")
                            point = served_rate(
                                server.port,
                                request,
                                batch,
                                concurrency,
                                args.seconds,
                                pool,
                                processes,
                            )
                            result["grid"].append(
                                dict(model=model, batch=batch, concurrency=concurrency)
                                | {"dynamic_batching": dynamic, **point}
                            )
    return result


# -- 4. extraction ----------------------------------------------------------------------------


def extraction(args: argparse.Namespace, scratch: Path, failures: list[str]) -> dict:
    model = "digits" if args.quick else "trained"
    if not (args.repository / model).is_dir():
        failures.append(f"extract: no {model!r} model (the training section exports it)")
        return {}
    if args.quick:
        data = ["--dataset", "digits"]
    else:
        import extract as extract_bench

        tiled = extract_bench.tile_mnist(args.mnist_path, args.rows, scratch / "tiled")
        data = ["--dataset", "mnist-idx", "--data-path", str(tiled)]
    result = {"rows": args.rows, "model": model, "jobs": []}
    backends = [("local", ["--local", str(args.repository / model)])]
    if args.quick:  # Ray's start-up would be most of a smoke run; tests/test_extract.py has it
        result["ray"] = "left out of --quick"
    elif importlib.util.find_spec("ray") is None:
        result["ray"] = "not installed here: not measured"
    else:
        backends.append(("ray", ["--ray", str(args.repository / model), "--workers", "1"]))
    for name, backend in backends:
        print(f"extract: {name}, {args.rows:,} rows ...", flush=True)
        output = scratch / (f"{name}.npz" if name == "local" else f"{name}.parquet")
        log = scratch / f"embed-{name}.log"
        command = aet("embed", *backend, *data, "--device", args.device, "--output", str(output))
        code, seconds, lines = run_timed(
            command + ["--batch-size", "4096", "--no-progress"], log, 600
        )
        entry = {"backend": name, "exit_code": code, "job_seconds": seconds}
        summary = [line for _, line in lines if line.startswith("embedded ")]
        if code != 0 or not summary:
            failures.append(f"embed {name} exited {code}: {tail(log)}")
        else:
            found = re.search(r"embedded (\d+) rows in ([\d.]+) s \(([\d,]+) rows/s", summary[-1])
            if found:
                entry.update(rows=int(found[1]), rows_per_s=float(found[3].replace(",", "")))
        result["jobs"].append(entry)
    return result


# -- report -----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env, lines = report.get("env", {}), [f"# GPU check, {report['date']} ({report['device']})", ""]
    if env:
        lines += [
            f"- GPU: {env.get('nvidia_smi', 'no nvidia-smi')}; torch {env['versions'].get('torch')}"
            f" (CUDA {env.get('torch_cuda')}), onnxruntime "
            f"{env['versions'].get('onnxruntime-gpu') or env['versions'].get('onnxruntime')} "
            f"providers {', '.join(env['onnxruntime_providers'])}; Python {env['python']}",
            "",
        ]
    train = report.get("train")
    if train:
        lines += [
            f"## Training: `aet pretrain --recipe {train['recipe']}`, {train['epochs']} epochs",
            "",
            "| precision | s / epoch (first) | logistic probe, model (pixels) |",
            "|---|---:|---|",
        ]
        for run in train["runs"]:
            if run["ok"]:
                probe = " / ".join(f"{a:.3f}" for a in run.get("logistic_probe", []))
                pixels = " / ".join(f"{a:.3f}" for a in run.get("pixels_probe", []))
                lines.append(
                    f"| {run['precision']} | {run['seconds_per_epoch']:.2f} "
                    f"({run['first_epoch_seconds']:.2f}) | {probe} ({pixels}) |"
                )
            else:
                lines.append(f"| {run['precision']} | failed (exit {run['exit_code']}) | |")
        torchrun = train.get("torchrun", {})
        epoch = torchrun.get("first_epoch_seconds")
        lines += [
            "",
            "torchrun --nproc-per-node 1: "
            + (f"one epoch in {epoch:.2f} s" if torchrun.get("ok") else "failed"),
            "",
        ]
    serve = report.get("serve")
    if serve:
        lines += ["## Serving", ""]
        for model, check in serve.get("checks", {}).items():
            lines.append(
                f"- {model}: {check['provider']}, max abs diff vs CPU "
                f"{check['max_abs_diff_vs_cpu']:.1e}"
            )
        lines += [
            "",
            "| model | batch | in-process rows/s | clients | rows/s dynamic (p50 / p99 ms) | "
            "rows/s plain (p50 / p99 ms) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        limits = {(p["model"], p["batch"]): p["rows_per_s"] for p in serve["in_process"]}
        points = {
            (p["model"], p["batch"], p["concurrency"], p["dynamic_batching"]): p
            for p in serve["grid"]
        }
        for model, batch, concurrency, dynamic in points:
            if not dynamic:
                continue
            cells = []
            for mode in (True, False):
                p = points.get((model, batch, concurrency, mode))
                cells.append(
                    f"{p['rows_per_s']:,.0f} ({p['p50_ms']:.2f} / {p['p99_ms']:.2f})" if p else "-"
                )
            lines.append(
                f"| {model} | {batch} | {limits.get((model, batch), float('nan')):,.0f} | "
                f"{concurrency} | {cells[0]} | {cells[1]} |"
            )
        lines.append("")
    extract = report.get("extract")
    if extract:
        lines += [f"## Extraction: {extract['rows']:,} rows, model {extract['model']}", ""]
        for job in extract["jobs"]:
            rate = f"{job['rows_per_s']:,.0f} rows/s" if "rows_per_s" in job else "failed"
            lines.append(f"- {job['backend']}: {rate}, job {job['job_seconds']:.1f} s")
        if "ray" in extract:
            lines.append(f"- ray: {extract['ray']}")
        lines.append("")
    lines += ["## Failures", ""] + ([f"- {f}" for f in report["failures"]] or ["none"])
    return "\n".join(lines) + "\n"


SECTIONS = ("env", "train", "serve", "extract")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=BENCH / "results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="digits only, tiny grid (smoke run)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per precision")
    parser.add_argument("--rows", type=int, default=1_000_000, help="extraction rows")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per load point")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--mnist-path", type=Path, default=None, help="MNIST IDX folder")
    parser.add_argument(
        "--skip-probe",
        action="store_true",
        help="no probe after the fp32 run either (the other runs and torchrun's always stop "
        "after their epochs: the evaluation takes minutes, the same on any device)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder kept for a later call (the trained model, the repository); default: a "
        "temporary one, removed at the end",
    )
    args = parser.parse_args(argv)
    args.sections = args.sections.split(",")
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: expected some of {', '.join(SECTIONS)}, got {sorted(unknown)}")
    for name in ("epochs", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    for name in ("results", "work", "mnist_path"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if args.quick:
        args.epochs, args.rows, args.seconds = 1, 1797, min(args.seconds, 0.3)
    if args.mnist_path is None:
        from aet.training.data import default_mnist_dir

        args.mnist_path = default_mnist_dir().resolve()
    if not args.quick and {"train", "extract"} & set(args.sections):
        if not Path(args.mnist_path).is_dir():
            parser.error(f"--mnist-path: expected the MNIST IDX folder, got {args.mnist_path}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not nvidia_gpu_present():
        print(
            "bench/gpu.py: no NVIDIA GPU on this machine; nothing measured (--device cpu runs "
            "the same steps on CPU)"
        )
        return 0
    failures: list[str] = []
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "quick": args.quick,
        "failures": failures,
    }
    steps = {"env": environment, "train": training, "serve": serving, "extract": extraction}
    with contextlib.ExitStack() as stack:
        scratch = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory("aet-gpu-")))
        scratch.mkdir(parents=True, exist_ok=True)
        # Children run `python -m aet...` from here: a checkout's aet/ folder in the working
        # directory would shadow the package that bench/gpu.sh put on PYTHONPATH.
        os.chdir(scratch)
        args.repository = scratch / "repository"
        if not args.repository.is_dir():
            build_repository(args)
        for section in SECTIONS:
            if section not in args.sections:
                continue
            started = time.perf_counter()
            try:
                report[section] = steps[section](args, scratch, failures)
            except Exception as exc:  # one broken section must not hide the others' figures
                failures.append(f"{section}: {type(exc).__name__}: {exc}")
            report.setdefault("section_seconds", {})[section] = time.perf_counter() - started
            print(f"{section}: done in {report['section_seconds'][section]:.0f} s", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.results / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
