"""`aet demo`: the whole flow on one command: serve the shipped encoder, embed, probe, stop.

On digits (the default) it starts `aet serve` on a free 127.0.0.1 port over the repository
holding `exported/digits`, waits until the model is SERVING, extracts embeddings of every row
through gRPC (`aet embed --server`), trains the probes (`aet probe`), prints the results table
and where the plots are, and stops the server with SIGTERM (a graceful shutdown). `--pretrain`
first trains and exports a fresh encoder (`aet pretrain`, `aet export`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from aet.clients.backends import ServerBackend
from aet.clients.client import EmbeddingClient
from aet.clients.extract import EmbedConfig, extract, read_embeddings
from aet.clients.probe import ProbeConfig, dataset_of, probe, write_results
from aet.clients.server_process import ServerProcess
from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.training.data import DATASETS

MODEL_NAMES = {"digits": "digits", "mnist-idx": "mnist"}  # data set -> shipped model name


class DemoError(UserError):
    """A step of the demo failed, or its model is missing."""


@dataclass
class DemoConfig:
    """`aet demo`: which data, which encoder, where results go."""

    dataset: str = field(
        default="digits",
        metadata={"help": "data set of the training registry", "choices": sorted(DATASETS)},
    )
    data_path: Path | None = field(
        default=None, metadata={"help": "data file or folder (mnist-idx: the folder of IDX files)"}
    )
    repository: Path = field(
        default=Path("exported"), metadata={"help": "model repository the server serves"}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model to use (default: digits for digits, mnist for mnist-idx)"},
    )
    pretrain: bool = field(
        default=False,
        metadata={
            "help": "pretrain and export a fresh encoder first (otherwise use the shipped one)"
        },
    )
    epochs: int = field(
        default=15,
        metadata={
            "help": "with --pretrain: end-to-end epochs, a quick budget (aet pretrain alone runs "
            "the full schedule)"
        },
    )
    layer_epochs: int = field(
        default=5, metadata={"help": "with --pretrain: epochs of each greedy layer stage"}
    )
    output: Path | None = field(
        default=None,
        metadata={"help": "folder for embeddings and probe results (default: runs/demo/<dataset>)"},
    )
    label_counts: list[int] = field(
        default_factory=lambda: [100, 1000],
        metadata={"help": "probe label budgets; all labels are always added"},
    )
    seed: int = field(default=0, metadata={"help": "split, label-subset and training seed"})

    def __post_init__(self):
        if self.model is None:
            if self.dataset not in MODEL_NAMES:
                raise ConfigError(
                    f"model: no shipped model for data set {self.dataset!r}; pass "
                    f"--model (shipped: {', '.join(MODEL_NAMES.values())})"
                )
            self.model = MODEL_NAMES[self.dataset]
        if self.output is None:
            self.output = Path("runs") / "demo" / self.dataset
        for name in ("epochs", "layer_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")


def pretrain_and_export(config: DemoConfig) -> None:
    """`aet pretrain` into `runs/<model>`, then `aet export` into `config.repository`."""
    from aet.cli import main

    runs_dir = Path("runs")
    pretrain = [
        "pretrain",
        "--dataset",
        config.dataset,
        "--name",
        config.model,
        "--runs-dir",
        str(runs_dir),
        "--seed",
        str(config.seed),
        "--epochs",
        str(config.epochs),
        "--layer-epochs",
        str(config.layer_epochs),
    ]
    if config.data_path is not None:
        pretrain += ["--data-path", str(config.data_path)]
    export = [
        "export",
        "--run",
        str(runs_dir / config.model),
        "--repository",
        str(config.repository),
        "--model",
        config.model,
    ]
    for argv in (pretrain, export):
        print(f"$ aet {' '.join(argv)}", flush=True)
        if main(argv) != 0:
            raise DemoError(f"aet {argv[0]} failed; see the messages above")


def run_demo(config: DemoConfig) -> int:
    """The demo; returns the exit code."""
    started = time.perf_counter()
    if config.pretrain:
        pretrain_and_export(config)
    model_dir = config.repository / config.model
    if not model_dir.is_dir():
        raise DemoError(
            f"{model_dir}: no such model; run `aet demo --pretrain"
            f"{'' if config.dataset == 'digits' else ' --dataset ' + config.dataset}` to "
            f"train and export one first"
        )
    server = ServerProcess(config.repository, config.output / "server.log")
    try:
        server.wait_until_serving(config.model)
        print(f"server: aet serve on {server.target} (log: {server.log_path})", flush=True)
        embed_config = EmbedConfig(
            dataset=config.dataset,
            data_path=config.data_path,
            seed=config.seed,
            server=server.target,
            model=config.model,
            output=config.output / "embeddings.npz",
            overwrite=True,
        )
        with ServerBackend(EmbeddingClient(server.target), config.model) as backend:
            summary = extract(embed_config, backend)
        print(summary.line(), flush=True)
    finally:
        exit_code = server.stop()
    print(f"server: stopped (exit code {exit_code})", flush=True)

    table = read_embeddings(embed_config.output)
    probe_config = ProbeConfig(
        embeddings=embed_config.output,
        seed=config.seed,
        label_counts=config.label_counts,
        output=config.output / "probe",
    )
    results = probe(table, dataset_of(table, str(embed_config.output)), probe_config)
    paths = write_results(results, probe_config.output)
    print()
    print(results.markdown())
    print(f"results: {paths['markdown']}, {paths['json']}")
    print(f"plots: {paths['accuracy_plot']}, {paths['confusion_plot']}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0 if exit_code == 0 else 1


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))
