"""`aet demo`: the whole flow on one command: serve the shipped encoder, embed, probe, fit a
classifier head, serve it, classify, stop.

On digits (the default) it copies the latest version of `exported/digits` into a repository of
its own (`<output>/repository`, so the shipped repository is never written), starts `aet serve`
on a free 127.0.0.1 port over it, waits until the model is SERVING, extracts embeddings of every
row through gRPC (`aet embed --server`), trains the probes (`aet probe`) and prints the results
table. It then closes the loop: fits a classifier head on the served embeddings (`aet head`),
exports it into the demo's repository, has the running server load it (KServe
RepositoryModelLoad), classifies the test split over gRPC (`EmbeddingClient.classify`) and
prints the served accuracy beside the probe's and the head's at fit time; `<output>/head.json`
records them with the served predictions. Finally it stops the server with SIGTERM (a graceful
shutdown). `--pretrain` first trains and exports a fresh encoder (`aet pretrain`, `aet export`).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from aet.clients.backends import ServerBackend
from aet.clients.client import EmbeddingClient
from aet.clients.embeddings import EmbeddingTable, read_embeddings
from aet.clients.extract import EmbedConfig, extract
from aet.clients.server_process import ServerProcess
from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.proto import grpc_service_pb2, grpc_service_pb2_grpc
from aet.repository import CARD_FILE, find_model_version, read_model_card
from aet.training.dataspec import DataSpec

if TYPE_CHECKING:
    from aet.clients.probe import ProbeResults

DEFAULT_REPOSITORY = Path("exported")
MODEL_NAMES = {"digits": "digits", "mnist-idx": "mnist"}  # data set -> shipped model name


class DemoError(UserError):
    """A step of the demo failed, or its model is missing."""


@dataclass
class DemoConfig:
    """`aet demo`: which data, which encoder, where results go."""

    data: DataSpec = field(default_factory=DataSpec)
    repository: Path = field(
        default=DEFAULT_REPOSITORY, metadata={"help": "model repository the server serves"}
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

    def __post_init__(self):
        self.data = self.data.with_defaults()
        if self.model is None:
            if self.data.name not in MODEL_NAMES:
                raise ConfigError(
                    f"model: no shipped model for data set {self.data.name!r}; pass "
                    f"--model (shipped: {', '.join(MODEL_NAMES.values())})"
                )
            self.model = MODEL_NAMES[self.data.name]
        if self.output is None:
            self.output = Path("runs") / "demo" / self.data.name
        for name in ("epochs", "layer_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        """`model`, defaulted from the data set by `__post_init__`."""
        assert self.model is not None
        return self.model

    @property
    def output_dir(self) -> Path:
        """`output`, defaulted from the data set by `__post_init__`."""
        assert self.output is not None
        return self.output


def pretrain_and_export(config: DemoConfig) -> None:
    """`aet pretrain` into `runs/<model>`, then `aet export` into `config.repository`."""
    from aet.training.export import ExportConfig, export
    from aet.training.pretrain import PretrainConfig, pretrain
    from aet.training.train import TrainingConfig

    runs_dir = Path("runs")
    run = PretrainConfig(
        data=config.data,
        name=config.model_name,
        runs_dir=runs_dir,
        training=TrainingConfig(epochs=config.epochs, layer_epochs=config.layer_epochs),
    )
    if pretrain(run) != 0:
        raise DemoError("aet pretrain failed; see the messages above")
    export(ExportConfig(run=run.run_dir, repository=config.repository, model=config.model_name))


def shipped_model_dir(name: str) -> Path | None:
    """The copy of `exported/<name>` installed with the package: the wheel's package data
    `aet/exported/<name>`, or the checkout's `exported/<name>` under an editable install."""
    # installed: <site-packages>/aet/clients/demo.py; editable: <checkout>/clients/demo.py
    folder = Path(__file__).resolve().parents[1] / "exported" / name
    return folder if folder.is_dir() else None


def serving_repository(config: DemoConfig) -> Path:
    """A fresh repository of the demo's own, holding the encoder's latest verified version
    (outside a checkout the shipped encoder comes from the installed package)."""
    model_dir = config.repository / config.model_name
    if not model_dir.is_dir() and config.repository == DEFAULT_REPOSITORY:
        model_dir = shipped_model_dir(config.model_name) or model_dir
    if not model_dir.is_dir():
        raise DemoError(
            f"{model_dir}: no such model; run `aet demo --pretrain"
            f"{'' if config.data.name == 'digits' else ' --dataset ' + config.data.name}` to "
            f"train and export one first"
        )
    found = find_model_version(model_dir)  # refuses a version whose sha256 does not match
    root = config.output_dir / "repository"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(found.path, root / config.model_name / str(found.version))
    return root


def serve_head(
    config: DemoConfig,
    server: ServerProcess,
    admin_token: str,
    repository: Path,
    table: EmbeddingTable,
) -> dict:
    """Fit the head on the served embeddings, export it, have the running server load it
    (model control, with `admin_token`) and classify the test split over gRPC; returns the
    figures for `head.json`."""
    from aet.clients.head import HeadConfig, build_head  # torch, scikit-learn: only here
    from aet.clients.probe import dataset_of

    name = f"{config.model_name}-head"
    version = build_head(HeadConfig(model=repository / config.model_name, name=name), table)
    card = read_model_card(version / CARD_FILE)
    assert card.classifier is not None  # build_head writes classifier cards
    print(f"head: {card.classifier.head} {card.classifier.settings} -> {version}", flush=True)
    with grpc.insecure_channel(server.target) as channel:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            grpc_service_pb2.RepositoryModelLoadRequest(model_name=name),
            timeout=60,
            metadata=[("authorization", f"Bearer {admin_token}")],
        )
    server.wait_until_serving(name)
    dataset = dataset_of(table, "the served embeddings")
    pixels = dataset.raw(dataset.test.x)
    with EmbeddingClient(server.target) as client:
        served = client.classify(pixels, name, card.version)
    return {
        "model": name,
        "version": card.version,
        "head": card.classifier.head,
        "settings": card.classifier.settings,
        "fitted_test_accuracy": card.metrics["test_accuracy"],
        "served_test_accuracy": float((served.predicted == dataset.test.y).mean()),
        "served_test_predictions": served.predicted.tolist(),
    }


def run_demo(config: DemoConfig) -> int:
    """The demo; returns the exit code."""
    started = time.perf_counter()
    if config.pretrain:
        pretrain_and_export(config)
    repository = serving_repository(config)
    admin_token = secrets.token_urlsafe(32)  # model control: only the demo loads its head
    token_file = config.output_dir / "admin-token"
    token_file.unlink(missing_ok=True)
    token_file.touch(mode=0o600)  # readable by the owner only, before the token is in it
    token_file.write_text(admin_token + "\n")
    server = ServerProcess(
        repository,
        config.output_dir / "server.log",
        *("--model-control", "--admin-token-file", str(token_file)),
    )
    try:
        # scikit-learn and torch load while the server starts, and only once a model is there
        from aet.clients.probe import ProbeConfig, dataset_of, probe, write_results

        server.wait_until_serving(config.model_name)
        print(f"server: aet serve on {server.target} (log: {server.log_path})", flush=True)
        embed_config = EmbedConfig(
            data=config.data,
            server=server.target,
            model=config.model_name,
            output=config.output_dir / "embeddings.npz",
            overwrite=True,
        )
        with ServerBackend(EmbeddingClient(server.target), config.model_name) as backend:
            summary = extract(embed_config, backend)
        print(summary.line(), flush=True)

        table = read_embeddings(embed_config.output_path)
        probe_config = ProbeConfig(
            embeddings=embed_config.output_path,
            data=DataSpec(seed=config.data.seed),
            label_counts=config.label_counts,
            output=config.output_dir / "probe",
        )
        results = probe(table, dataset_of(table, str(embed_config.output_path)), probe_config)
        paths = write_results(results, probe_config.output_dir)
        print()
        print(results.markdown())
        print(f"results: {paths['markdown']}, {paths['json']}")
        print(f"plots: {paths['accuracy_plot']}, {paths['confusion_plot']}", flush=True)
        head = serve_head(config, server, admin_token, repository, table)
    finally:
        exit_code = server.stop()
    print(f"server: stopped (exit code {exit_code})", flush=True)
    head["probe_test_accuracy"] = results.accuracy["embedding"]["logreg"][-1]
    (config.output_dir / "head.json").write_text(json.dumps(head, indent=2) + "\n")
    print(head_line(head, results))
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0 if exit_code == 0 else 1


def head_line(head: dict, results: ProbeResults) -> str:
    """The served accuracy beside the probe's and the head's at fit time."""
    rows = len(head["served_test_predictions"])
    return (
        f"test accuracy with all {results.label_counts[-1]:,} labels: probe (logistic "
        f"regression) {head['probe_test_accuracy']:.4f}; head {head['model']} "
        f"v{head['version']} at fit time {head['fitted_test_accuracy']:.4f}, served over gRPC "
        f"{head['served_test_accuracy']:.4f} ({rows} rows)"
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))
