"""The novelty score `reconstruction_error`: computed in the exported graph, calibrated in
model.json, served on request by both APIs, and run in-process by `aet.Encoder`.

The check on real data uses the shipped encoder `exported/digits/1`."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from kserve_harness import add_version, kserve_request, kserve_stub, start_kserve_server
from sklearn.metrics import roc_auc_score

from aet.cli import main
from aet.clients.backends import EncoderActor
from aet.clients.client import EmbeddingClient
from aet.clients.embeddings import read_embeddings
from aet.clients.extract import extraction_rows
from aet.encoder import Encoder
from aet.proto import embedding_pb2 as pb
from aet.proto import grpc_service_pb2 as kserve_pb
from aet.proto.codec import decode_tensor, encode_tensor
from aet.repository import find_model_version, read_model_card
from aet.runtime import EncoderSession, RuntimeOptions, embedding_graph
from aet.training.data import load_dataset

SHIPPED = Path(__file__).resolve().parents[1] / "exported" / "digits"
WAIT = 30.0


@pytest.fixture(scope="module")
def shipped() -> Encoder:
    return Encoder.load(SHIPPED, threads=1)


def salt_and_pepper(x: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """`x` in [0, 1] with `fraction` of the pixels set to 0 or 1 (half each), seeded."""
    draw = np.random.default_rng(seed).random(x.shape)
    noisy = x.copy()
    noisy[draw < fraction / 2] = 0.0
    noisy[(draw >= fraction / 2) & (draw < fraction)] = 1.0
    return noisy


def auroc(clean: np.ndarray, unusual: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(clean)), np.ones(len(unusual))]
    return float(roc_auc_score(labels, np.r_[clean, unusual]))


def test_shipped_digits_score_separates_noisy_and_inverted_digits(shipped):
    """Real data: the shipped encoder's score tells the digits test split from the same digits
    with 30 % salt-and-pepper noise and from inverted digits (AUROC >= 0.95); the stored p99
    (of 126 validation rows, itself uncertain) flags at most 3 % of the clean test rows (the
    p-values' validity: tests/test_calibration.py)."""
    test = load_dataset("digits").test.x  # (540, 1, 8, 8) in [0, 1]: never trained on
    raw = lambda x: (x * 16.0).astype(np.float32)  # noqa: E731  the graph takes 0..16
    clean = shipped.reconstruction_error(raw(test))
    noisy = shipped.reconstruction_error(raw(salt_and_pepper(test, 0.3)))
    inverted = shipped.reconstruction_error(raw(1.0 - test))
    assert auroc(clean, noisy) >= 0.95 and auroc(clean, inverted) >= 0.95
    assert (clean > shipped.score_percentiles["p99"]).mean() <= 0.03
    np.testing.assert_array_equal(shipped.score_samples(raw(test)), -clean)  # sklearn's sign


def test_shipped_card_records_the_score_and_its_validation_percentiles(shipped):
    card = read_model_card(SHIPPED / "1" / "model.json")
    assert card.score.name == "reconstruction_error" and card.score.calibration_split == "val"
    assert card.score.calibration_rows == card.dataset["sizes"]["val"]
    levels = [card.score.percentiles[p] for p in ("p50", "p90", "p99", "p99.9")]
    assert levels == sorted(levels) and levels[-1] > 0  # standardised: may be below zero
    assert shipped.score_percentiles == card.score.percentiles


def test_embedding_requests_run_the_graph_cut_down_to_the_encoder(tmp_path):
    """onnxruntime runs every node whatever the requested outputs, so embeddings alone run a
    graph without the decoder; they equal the full graph's, and so does the score."""
    full = onnx.load(SHIPPED / "1" / "model.onnx")
    cut = onnx.load_from_string(embedding_graph(full, "pixels", "embedding"))
    assert [o.name for o in cut.graph.output] == ["embedding"]
    assert len(cut.graph.node) < len(full.graph.node) and len(cut.graph.initializer) <= len(
        full.graph.initializer
    )
    session = EncoderSession(
        SHIPPED / "1" / "model.onnx",
        "pixels",
        "embedding",
        (1, 8, 8),
        ["CPUExecutionProvider"],
        RuntimeOptions(intra_op_threads=1),
        score_name="reconstruction_error",
    )
    pixels = np.random.default_rng(0).uniform(0, 16, (37, 1, 8, 8)).astype(np.float32)
    scored = session.run(pixels, ("embedding", "reconstruction_error"))
    assert scored["embedding"].shape == (37, 32) and scored["reconstruction_error"].shape == (37,)
    np.testing.assert_allclose(session.run(pixels)["embedding"], scored["embedding"], atol=1e-6)


def test_our_api_returns_the_score_only_when_asked(model_repository, start_server, embedding_stub):
    running = start_server(model_repository)
    stub = embedding_stub(running)
    model = running.registry.lookup("digits")
    pixels = load_dataset("digits").test.x[:50] * np.float32(16)
    request = pb.EmbedRequest(model="digits", inputs=encode_tensor(pixels))
    plain = stub.Embed(request, timeout=WAIT)
    assert not plain.HasField("reconstruction_error") and model.scorer.stats.batches == 0
    request.options.reconstruction_error = True
    scored = stub.Embed(request, timeout=WAIT)
    scores = decode_tensor(scored.reconstruction_error, "reconstruction_error")
    local = Encoder.load(model_repository / "digits", threads=1)
    np.testing.assert_allclose(scores, local.reconstruction_error(pixels), rtol=1e-5)
    np.testing.assert_array_equal(
        decode_tensor(scored.embeddings, "e"), decode_tensor(plain.embeddings, "e")
    )
    assert model.scorer.stats.batches == 1 and scores.shape == (50,)
    request.options.p_value = True  # a post-step from the score, with the calibration file
    both = stub.Embed(request, timeout=WAIT)
    np.testing.assert_array_equal(decode_tensor(both.p_value, "p"), local.p_value(pixels))
    np.testing.assert_allclose(decode_tensor(both.reconstruction_error, "r"), scores, rtol=1e-6)
    description = stub.DescribeModel(pb.DescribeModelRequest(model="digits"), timeout=WAIT)
    assert description.score.name == "reconstruction_error"

    with EmbeddingClient(f"127.0.0.1:{running.port}") as client:
        embeddings, client_scores = client.embed_with_score(pixels, "digits")
    np.testing.assert_allclose(client_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(embeddings, local.transform(pixels), atol=1e-6)


def test_kserve_returns_the_score_as_a_second_output_requested_by_name(model_repository):
    live = start_kserve_server(model_repository)
    pixels = load_dataset("digits").test.x[:5] * np.float32(16)
    local = Encoder.load(model_repository / "digits", threads=1)
    try:
        with grpc.insecure_channel(live.target) as channel:
            error = _kserve_checks(kserve_stub(channel), pixels, local)
    finally:
        live.stop()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "outputs[0].name: expected 'embedding' or 'reconstruction_error' or 'p_value', "
        "got 'error'" in error.details()
    )


def _kserve_checks(stub, pixels: np.ndarray, local: Encoder) -> grpc.RpcError:
    """Metadata, the default, both outputs in the asked order; the error of an unknown one."""
    requested = kserve_pb.ModelInferRequest.InferRequestedOutputTensor
    metadata = stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name="digits"), timeout=WAIT)
    assert [(o.name, list(o.shape)) for o in metadata.outputs] == [
        ("embedding", [-1, 8]),
        ("reconstruction_error", [-1]),
        ("p_value", [-1]),
    ]
    default = stub.ModelInfer(kserve_request(pixels, model_name="digits"), timeout=WAIT)
    assert [o.name for o in default.outputs] == ["embedding"]  # the score costs the decoder
    both = kserve_request(
        pixels,
        model_name="digits",
        outputs=[requested(name="reconstruction_error"), requested(name="embedding")],
    )
    answer = stub.ModelInfer(both, timeout=WAIT)
    assert [(o.name, list(o.shape)) for o in answer.outputs] == [
        ("reconstruction_error", [5]),
        ("embedding", [5, 8]),
    ]
    scores = np.frombuffer(answer.raw_output_contents[0], "<f4")
    np.testing.assert_allclose(scores, local.reconstruction_error(pixels), rtol=1e-5)
    p_only = kserve_request(pixels, model_name="digits", outputs=[requested(name="p_value")])
    answer = stub.ModelInfer(p_only, timeout=WAIT)
    assert [(o.name, list(o.shape)) for o in answer.outputs] == [("p_value", [5])]
    np.testing.assert_array_equal(
        np.frombuffer(answer.raw_output_contents[0], "<f4"), local.p_value(pixels)
    )
    wrong = kserve_request(pixels, model_name="digits", outputs=[requested(name="error")])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(wrong, timeout=WAIT)
    return error.value


def test_a_model_without_the_score_says_so(tmp_path, start_server, embedding_stub):
    """A graph exported before the score existed (one output, no `score` in its card)."""
    add_version(tmp_path, 3)
    running = start_server(tmp_path)
    model = running.registry.lookup("digits")
    assert model.card.score is None and model.scorer is None
    pixels = np.zeros((2, *model.card.input.shape), np.float32)
    request = pb.EmbedRequest(
        model="digits",
        inputs=encode_tensor(pixels),
        options=pb.EmbedOptions(reconstruction_error=True),
    )
    with pytest.raises(grpc.RpcError) as error:
        embedding_stub(running).Embed(request, timeout=WAIT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(
        "options.reconstruction_error: model 'digits' version 1 has no reconstruction_error"
    )
    with pytest.raises(ValueError, match="has no novelty score .* export it again"):
        Encoder.load(tmp_path / "digits").reconstruction_error(pixels)
    request.options.reconstruction_error = False
    request.options.p_value = True
    with pytest.raises(grpc.RpcError) as error:
        embedding_stub(running).Embed(request, timeout=WAIT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(
        "options.p_value: model 'digits' version 1 has no p_value output (exported without "
        "calibration scores"
    )
    plain = embedding_stub(running).Embed(
        pb.EmbedRequest(model="digits", inputs=encode_tensor(pixels)), timeout=WAIT
    )
    assert decode_tensor(plain.embeddings, "e").shape[0] == 2  # old graphs still embed


def test_aet_embed_score_writes_the_score_beside_the_embeddings(
    model_repository, embedding_server, tmp_path
):
    """`aet embed --score` through the local and the server backends: the same scores as
    `Encoder.reconstruction_error`, in the output's row order, in npz and Parquet."""
    local = Encoder.load(model_repository / "digits", threads=1)
    pixels = extraction_rows(load_dataset("digits", limit=300)).pixels
    common = ["--limit", "300", "--score", "--no-progress", "--batch-size", "64"]
    outputs = {
        "local.npz": ["--local", str(model_repository / "digits")],
        "server.parquet": ["--server", f"127.0.0.1:{embedding_server.port}", "--model", "digits"],
    }
    for name, backend in outputs.items():
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["embed", *backend, *common, "--output", str(tmp_path / name)]) == 0
        table = read_embeddings(tmp_path / name)
        assert table.scores.shape == (300,) and table.embeddings.shape == (300, 8)
        np.testing.assert_allclose(table.scores, local.reconstruction_error(pixels), rtol=1e-5)
        np.testing.assert_allclose(table.embeddings, local.transform(pixels), atol=1e-5)
    plain = tmp_path / "plain.npz"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                ["embed", *outputs["local.npz"], "--limit", "20", "--no-progress"]
                + ["--output", str(plain)]
            )
            == 0
        )
    assert read_embeddings(plain).scores is None


def test_ray_actors_add_the_score_column(model_repository):
    """The Ray pipeline's onnxruntime actor, called as Ray Data calls it, outside Ray."""
    found = find_model_version(model_repository / "digits")
    local = Encoder.load(model_repository / "digits", threads=1)
    pixels = extraction_rows(load_dataset("digits", limit=40)).pixels
    batch = {
        "id": np.arange(40),
        "split": np.full(40, "train"),
        "label": np.zeros(40, np.int64),
        "pixels": pixels,
    }
    onnx_bytes = found.model_path.read_bytes()
    scored = EncoderActor(onnx_bytes, found.card, "cpu", batch_size=16, score=True)(batch)
    assert scored.column_names == ["id", "split", "label", "embedding", "reconstruction_error"]
    np.testing.assert_allclose(
        scored.column("reconstruction_error").to_numpy(),
        local.reconstruction_error(pixels),
        rtol=1e-5,
    )
    plain = EncoderActor(onnx_bytes, found.card, "cpu", batch_size=16)(batch)
    assert plain.column_names == ["id", "split", "label", "embedding"]
