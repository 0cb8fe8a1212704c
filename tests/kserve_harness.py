"""What the KServe, metrics, auth, reload and bad-request tests share: a model repository of tiny
real ONNX encoders, and a real server on 127.0.0.1 with the KServe v2 API, Prometheus metrics,
the repository reloader and, when asked, bearer tokens and TLS; wired as `aet serve` wires them.
"""

from __future__ import annotations

import collections
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import onnx
from conftest import serve_config_for_tests
from onnx import TensorProto, helper, numpy_helper

from aet.proto import embedding_pb2, embedding_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from aet.proto.codec import encode_tensor
from aet.repository import InputSpec, ModelCard, OutputSpec, write_version
from aet.server.app import App, build_app

MODEL = "digits"
ROW_SHAPE = (1, 8, 8)
RAW_MAX = 16.0
EMBEDDING_DIM = 4
ADMIN_TOKEN = "admin-token-for-tests"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]  # call metadata allowing model control


def encoder_onnx(seed: int) -> bytes:
    """pixels (batch, 1, 8, 8) in [0, 16] -> flatten(pixels / 16) @ W: a tiny real encoder."""
    weights = np.random.default_rng(seed).standard_normal((64, EMBEDDING_DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["pixels", "raw_max"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
        ],
        "tiny_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *ROW_SHAPE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])],
        [
            numpy_helper.from_array(np.array(RAW_MAX, np.float32), "raw_max"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def expected_embeddings(pixels: np.ndarray, seed: int) -> np.ndarray:
    """What `encoder_onnx(seed)` computes, in numpy."""
    weights = np.random.default_rng(seed).standard_normal((64, EMBEDDING_DIM)).astype(np.float32)
    return (pixels.reshape(len(pixels), -1) / RAW_MAX) @ weights


def add_version(root: Path, seed: int, name: str = MODEL) -> Path:
    """Write the next version of `name` (weights drawn with `seed`); its folder."""
    card = ModelCard.draft(
        name,
        "linear",
        InputSpec("pixels", ROW_SHAPE, "float32", (0.0, RAW_MAX)),
        OutputSpec("embedding", "float32", EMBEDDING_DIM),
        hyperparameters={"seed": seed},
        preprocessing=["divide by 16", "flatten"],
        dataset={"name": "digits"},
        opset=17,
        library_versions={"onnx": onnx.__version__},
    )
    return write_version(root, name, encoder_onnx(seed), card)


def digits_pixels(rows: int, seed: int = 0) -> np.ndarray:
    """`rows` float32 inputs (rows, 1, 8, 8) in the model's range [0, 16]."""
    return np.random.default_rng(seed).uniform(0, RAW_MAX, (rows, *ROW_SHAPE)).astype(np.float32)


def start_kserve_server(
    repository: Path,
    *,
    tokens: tuple[str, ...] = (),
    poll_seconds: float = 0.0,
    tracer=None,
    **config: object,
) -> App:
    """`aet serve`'s app (`build_app`) over `repository` on a free 127.0.0.1 port with its
    metrics endpoint, one onnxruntime thread per session and model control for `ADMIN`,
    loaded; `tokens` are accepted bearer tokens, spans go to `tracer` (an OpenTelemetry
    tracer), `config` further `ServeConfig` fields by flag name."""
    with tempfile.TemporaryDirectory(prefix="aet-tokens-") as name:  # read by build_app alone
        folder = Path(name)
        token_file = None
        if tokens:
            token_file = folder / "tokens"
            token_file.write_text("\n".join(tokens) + "\n")
        (folder / "admin").write_text(ADMIN_TOKEN + "\n")
        values = dict(
            repository=repository,
            metrics_port=0,
            workers=16,
            max_streams=8,
            poll_repository=poll_seconds,
            token_file=token_file,
            model_control=True,
            admin_token_file=folder / "admin",
        )
        app = build_app(serve_config_for_tests(**{**values, **config}), tracer=tracer)
    app.load()
    return app


class BatchGate:
    """Holds a model version's batcher inside its next batch (in the batch's thread, after the
    run) until `open()`: what is queued behind it stays queued, deterministically."""

    def __init__(self, model, safety_net: float = 60.0) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self._listeners = model.batcher.stats.listeners
        self._safety_net = safety_net
        self._listeners.append(self._hold)

    def _hold(self, record) -> None:
        self._listeners.remove(self._hold)
        self.entered.set()
        self._release.wait(self._safety_net)  # a safety net against a hung test, never timing

    def wait_entered(self) -> None:
        assert self.entered.wait(self._safety_net), "the held batch never ran"

    def open(self) -> None:
        self._release.set()


def kserve_stub(channel: grpc.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def kserve_request(pixels: np.ndarray, **fields) -> grpc_service_pb2.ModelInferRequest:
    """A ModelInfer request for MODEL (unless `model_name` says otherwise) with raw FP32 bytes."""
    return grpc_service_pb2.ModelInferRequest(
        **{"model_name": MODEL, **fields},
        inputs=[
            grpc_service_pb2.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=pixels.shape
            )
        ],
        raw_input_contents=[pixels.astype("<f4").tobytes()],
    )


class SteadyTraffic:
    """Threads sending good requests for the latest version of MODEL on both APIs until
    stopped, checking each answer against the weights of the version that gave it."""

    def __init__(
        self,
        channel: grpc.Channel,
        seed_of_version: dict[int, int],
        metadata: Sequence[tuple[str, str]] = (),
        threads: int = 3,
    ) -> None:
        self.seed_of_version = seed_of_version  # may grow while running, as versions appear
        self.metadata = tuple(metadata)
        self.kserve = kserve_stub(channel)
        self.embed = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self.answered_by: collections.Counter[int] = collections.Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(i,)) for i in range(threads)]

    def __enter__(self) -> SteadyTraffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def answered(self) -> int:
        return sum(self.answered_by.values())

    def wait_for_answers(self, version: int, count: int, timeout: float = 60.0) -> None:
        """Block until `version` has answered `count` more requests (or fail after `timeout`)."""
        target = self.answered_by[version] + count
        give_up = time.monotonic() + timeout
        while self.answered_by[version] < target:
            if time.monotonic() > give_up or self.failures:
                raise AssertionError(
                    f"version {version} answered {self.answered_by[version]} "
                    f"requests, expected {target}; failures: {self.failures}"
                )
            time.sleep(0.01)

    def _send(self, thread_seed: int) -> None:
        rng = np.random.default_rng(thread_seed)
        while not self._stop.is_set():
            pixels = digits_pixels(int(rng.integers(1, 4)), seed=int(rng.integers(1 << 30)))
            try:
                if rng.random() < 0.5:
                    reply = self.kserve.ModelInfer(
                        kserve_request(pixels), metadata=self.metadata, timeout=30
                    )
                    version, data = int(reply.model_version), reply.raw_output_contents[0]
                else:
                    reply = self.embed.Embed(
                        embedding_pb2.EmbedRequest(model=MODEL, inputs=encode_tensor(pixels)),
                        metadata=self.metadata,
                        timeout=30,
                    )
                    version, data = reply.version, reply.embeddings.data
                got = np.frombuffer(data, "<f4").reshape(len(pixels), -1)
                want = expected_embeddings(pixels, self.seed_of_version[version])
                error = (
                    None
                    if np.allclose(got, want, rtol=1e-5, atol=1e-5)
                    else (f"version {version}: wrong embeddings")
                )
            except grpc.RpcError as exc:
                version, error = None, f"{exc.code()}: {exc.details()}"
            with self._lock:
                if error is None:
                    self.answered_by[version] += 1
                else:
                    self.failures.append(error)
