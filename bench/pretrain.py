"""Pretraining throughput: samples/s, the share of step time outside forward/backward, peak memory.

For each case it times whole epochs of the real training loop (`Trainer.train_epoch`: batch
slicing, corruption, forward, backward, Adam, loss bookkeeping and the progress bar) and, on the
same model and batches, the compute alone (forward + backward + Adam step). The difference is
the loop's overhead (data, corruption, logging); the issue requires it to stay <= 10 %.
Throughput uses wall time; the overhead share uses this process's CPU time, which a shared
machine's other load (and the hypervisor's steal) does not inflate. Both keep the minimum over
repeats, the usual way to see through noise.

    python bench/pretrain.py [--threads 1 2] [--repeats 5] [--out bench/results/pretrain.json]
    python bench/pretrain.py --quick    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aet.config import add_config_arguments, config_from_args
from aet.training.data import Dataset, load_dataset
from aet.training.models import ModelConfig, build_autoencoder
from aet.training.train import Trainer, TrainingConfig

MNIST_DIR = Path(
    os.environ.get("AET_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared/data/mnist")
)
OVERHEAD_LIMIT = 0.10


@dataclass
class BenchConfig:
    threads: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "torch CPU thread counts to measure"}
    )
    repeats: int = field(default=5, metadata={"help": "timed epochs per case (minimum is kept)"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    progress: bool = field(
        default=True,
        metadata={"help": "keep the progress bar on in the timed loop, as users run it"},
    )
    out: Path = field(default=Path("bench/results/pretrain.json"), metadata={"help": "JSON output"})
    quick: bool = field(
        default=False,
        metadata={
            "help": "a smoke run in seconds: the digits case, one thread, one timed epoch; "
            "the overhead limit is reported, not enforced (default: off)"
        },
    )


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    model: ModelConfig


CASES = (
    Case(
        "digits mlp 256-64-8",
        "digits",
        ModelConfig(architecture="mlp", hidden_sizes=(256, 64), code_size=8),
    ),
    Case(
        "mnist mlp 512-128-32",
        "mnist-idx",
        ModelConfig(architecture="mlp", hidden_sizes=(512, 128), code_size=32),
    ),
    Case(
        "mnist conv 32-64-32",
        "mnist-idx",
        ModelConfig(architecture="conv", hidden_sizes=(32, 64), code_size=32),
    ),
)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_only(trainer: Trainer, batches: list[torch.Tensor]) -> None:
    """Forward + backward + optimizer step over ready-made batches: the loop without overhead."""
    model, optimizer = trainer.model.train(), trainer.optimizer
    for batch in batches:
        loss = model.objective(batch, batch, trainer.generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) spent in `work()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(case: Case, dataset: Dataset, threads: int, config: BenchConfig) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_autoencoder(case.model, dataset.image_shape)
    training = TrainingConfig(
        batch_size=config.batch_size, noise="gaussian", noise_level=0.2, progress=config.progress
    )
    rss_before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, dataset, training, Path(run_dir), run_config={})
        x = trainer.train_x
        batches = [x[i : i + config.batch_size] for i in range(0, len(x), config.batch_size)]
        trainer.train_epoch()  # warm-up: allocator, Adam state, lazy imports
        loops = [timed(trainer.train_epoch) for _ in range(config.repeats)]
        computes = [timed(lambda: compute_only(trainer, batches)) for _ in range(config.repeats)]
    loop_wall, loop_cpu = (min(times) for times in zip(*loops, strict=True))
    compute_cpu = min(cpu for _, cpu in computes)
    return {
        "case": case.name,
        "threads": threads,
        "examples_per_epoch": len(x),
        "steps_per_epoch": len(batches),
        "batch_size": config.batch_size,
        "samples_per_s": len(x) / loop_wall,
        "step_ms": 1000 * loop_wall / len(batches),
        "step_cpu_ms": 1000 * loop_cpu / len(batches),
        "compute_step_cpu_ms": 1000 * compute_cpu / len(batches),
        "overhead_share": max(0.0, 1 - compute_cpu / loop_cpu),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_growth_mb": peak_rss_mb() - rss_before,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'case':<22}{'threads':>8}{'samples/s':>11}{'step ms':>9}{'step CPU ms':>13}"
        f"{'compute CPU ms':>16}{'overhead':>10}{'peak RSS MB':>13}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['case']:<22}{r['threads']:>8}{r['samples_per_s']:>11.0f}{r['step_ms']:>9.2f}"
            f"{r['step_cpu_ms']:>13.2f}{r['compute_step_cpu_ms']:>16.2f}"
            f"{r['overhead_share']:>9.1%} {r['peak_rss_mb']:>12.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, BenchConfig)
    config = config_from_args(BenchConfig, parser.parse_args(argv))
    if config.quick:
        config = dataclasses.replace(config, threads=[1], repeats=1)
    datasets = {"digits": load_dataset("digits")}
    if config.quick:
        print("quick: the digits case only")
    elif MNIST_DIR.is_dir():
        datasets["mnist-idx"] = load_dataset("mnist-idx", MNIST_DIR)
    else:
        print(f"MNIST not found in {MNIST_DIR} (set AET_MNIST_DIR): MNIST cases skipped")
    rows = [
        measure(case, datasets[case.dataset], threads, config)
        for case in CASES
        if case.dataset in datasets
        for threads in config.threads
    ]
    print(format_table(rows))
    worst = max(r["overhead_share"] for r in rows)
    print(f"worst overhead share {worst:.1%} (limit {OVERHEAD_LIMIT:.0%})")
    result = {
        "rows": rows,
        "overhead_limit": OVERHEAD_LIMIT,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {config.out}")
    return 0 if worst <= OVERHEAD_LIMIT or config.quick else 1


if __name__ == "__main__":
    sys.exit(main())
