"""Shared fixtures: a real digits encoder trained and exported in the test session, and real
gRPC servers over it on 127.0.0.1 ephemeral ports.

- `digits_dataset`, `digits_checkpoint`: `load_digits` splits and a small MLP autoencoder
  trained for a few epochs (seeded), saved as `best.pt`.
- `model_repository`: a repository holding `digits/1`, written by `training.export`.
- `vector_model`: `vectors/1`, a tiny encoder of 6 raw features exported by
  `AutoencoderEmbedder.export`, for jobs on tables (npz, csv).
- `embedding_server`: one server for the session over `model_repository` (read-only use).
- `start_server(repository, interceptors=..., **config)`: a fresh `aet serve` (`build_app`)
  per test, stopped at teardown, for tests that change models or hold batches.
- `embedding_stub(server)`: an `aet.v1.EmbeddingService` stub on a server's port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from aet.clients.backends import GCS_PORT_WAIT_S, LocalBackend
from aet.config import config_from_mapping
from aet.proto.embedding_pb2_grpc import EmbeddingServiceStub as EmbeddingStub
from aet.server.app import App, RunningServer, ServeConfig, build_app

DIGITS_MODEL = "digits"
TEST_MESSAGE_MB = 8

# Ray starts its workers at niceness 15: beside other busy processes (a loaded CI machine) they
# then get almost no CPU and the Ray tests crawl. Tests run them at the priority of the rest, set
# before any test starts Ray so that child processes (ray start, bench scripts) inherit it.
os.environ.setdefault("RAY_worker_niceness", "0")
# The same for `ray start` in tests/test_ray_cluster.py: its GCS server gets the 120 s that
# `aet embed --ray` gives a local Ray (clients/backends.py), not Ray's 30 s.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)


class Interrupted(Exception):
    """What `InterruptedAfter` raises in place of a Ctrl-C."""


class InterruptedAfter(LocalBackend):
    """The real local backend, stopped (as by Ctrl-C) after `blocks` blocks in all: for the
    resume tests of `aet embed` and `aet predict`."""

    def __init__(self, model_dir, blocks: int):
        super().__init__(model_dir)
        self.blocks = blocks

    def embed_rows(self, pixels, batch_size):
        for rows in super().embed_rows(pixels, batch_size):
            if self.blocks == 0:
                raise Interrupted
            self.blocks -= 1
            yield rows


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)  # the test machine's cores are shared


@pytest.fixture(scope="session")
def digits_dataset():
    from aet.training.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits_dataset) -> Path:
    """`best.pt` of a small MLP autoencoder (64-32-8) trained 3 epochs on digits, seed 0.

    Trained as `aet pretrain --architecture mlp --hidden-sizes 32 --code-size 8 --epochs 3`
    would, without its evaluation and figures (not needed here, and slow).
    """
    from aet.training.pretrain import PretrainConfig

    config = config_from_mapping(
        PretrainConfig,
        dict(
            architecture="mlp",
            hidden_sizes=[32],
            code_size=8,
            epochs=3,
            progress=False,
            seed=0,
            name=DIGITS_MODEL,
            runs_dir=tmp_path_factory.mktemp("runs"),
        ),
    )
    trainer = config.trainer(digits_dataset, config.run_dir)
    trainer.fit()
    return trainer.best_path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, digits_checkpoint) -> Path:
    """A model repository with one real version, `digits/1`, written by `aet export`."""
    from aet.training.export import ExportConfig, export

    root = tmp_path_factory.mktemp("exported")
    export(ExportConfig(checkpoint=digits_checkpoint, repository=root, model=DIGITS_MODEL))
    return root


@pytest.fixture(scope="session")
def vector_model(tmp_path_factory) -> Path:
    """`vectors/1`: an encoder of 6 features (2 epochs on 120 random rows, seed 0)."""
    import numpy as np

    from aet.sklearn import AutoencoderEmbedder

    x = np.random.default_rng(0).normal(size=(120, 6)).astype(np.float32)
    embedder = AutoencoderEmbedder(
        architecture="mlp", hidden_sizes=(4,), code_size=2, epochs=2, batch_size=32, seed=0
    ).fit(x)
    return embedder.export(tmp_path_factory.mktemp("exported"), "vectors")


def serve_config_for_tests(**overrides) -> ServeConfig:
    """A `ServeConfig` for tests: ephemeral port, one onnxruntime thread, small limits;
    `overrides` by flag name (e.g. `max_batch_size=8`)."""
    values = dict(
        port=0,
        intra_op_threads=1,
        inter_op_threads=1,
        workers=32,
        max_streams=16,
        max_message_mb=TEST_MESSAGE_MB,
        grace_period=5.0,
        drain_seconds=0.0,
    )
    return config_from_mapping(ServeConfig, {**values, **overrides})


def start_app(repository: Path, interceptors=(), **overrides) -> App:
    """`aet serve`'s app (`build_app`) over `repository`, loaded; `overrides` by flag name."""
    app = build_app(serve_config_for_tests(repository=repository, **overrides), interceptors)
    app.load()
    return app


@pytest.fixture(scope="session")
def embedding_server(model_repository) -> Iterator[RunningServer]:
    """One running server over `model_repository` for the whole session; do not change it."""
    app = start_app(model_repository)
    yield app.running
    app.stop(grace_period=1.0)


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with `start_server(repository, interceptors=..., **ServeConfig fields)`;
    all are stopped when the test ends."""
    started: list[App] = []

    def start(repository: Path, **kwargs) -> RunningServer:
        started.append(start_app(repository, **kwargs))
        return started[-1].running

    yield start
    for app in started:
        app.stop(grace_period=1.0)


@pytest.fixture
def embedding_stub() -> Iterator[Callable[[RunningServer], EmbeddingStub]]:
    """`embedding_stub(server)`: a stub on a channel that is closed when the test ends."""
    channels: list[grpc.Channel] = []

    def stub(running: RunningServer) -> EmbeddingStub:
        limit = TEST_MESSAGE_MB << 20
        channels.append(
            grpc.insecure_channel(
                f"127.0.0.1:{running.port}",
                options=[
                    ("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit),
                ],
            )
        )
        return EmbeddingStub(channels[-1])

    yield stub
    for channel in channels:
        channel.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make throwaway certificates")
    folder = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=aet test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=folder,
    )
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.pem",
            *extra,
            cwd=folder,
        )
    return folder
