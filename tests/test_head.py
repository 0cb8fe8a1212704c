"""Classifier heads end to end: `aet head` fits and exports, the server classifies on both APIs
(our `Classify`, KServe v2 with Triton's classification extension through `tritonclient`), the
clients and `aet predict` read the answers. One head is fitted for the module, on the session's
real digits encoder (`model_repository`), and reused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import torch
from conftest import Interrupted, InterruptedAfter
from kserve_harness import kserve_stub, start_kserve_server

from aet import Classifier
from aet.cli import main
from aet.clients.backends import LocalBackend
from aet.clients.client import EmbeddingClient, EmbeddingError
from aet.clients.head import HeadConfig, build_head, class_names
from aet.clients.predict import PredictConfig, predict, read_predictions
from aet.clients.probe import embed_in_process
from aet.proto import grpc_service_pb2 as pb
from aet.repository import RepositoryError, read_model_card, scan_repository
from aet.training.data import DataError, load_dataset
from aet.training.dataspec import DataSpec, SplitMismatch
from aet.training.heads import HeadError, fit_mlp_head
from aet.training.probes import tune_logistic

ENCODER = "digits"
HEAD = "digits-head"
LABELS = tuple("0123456789")


@pytest.fixture(scope="module")
def repository(tmp_path_factory, model_repository) -> Path:
    """A repository holding a copy of the session's encoder, and the heads of this module."""
    root = tmp_path_factory.mktemp("heads")
    shutil.copytree(model_repository / ENCODER, root / ENCODER)
    return root


@pytest.fixture(scope="module")
def head(repository) -> Path:
    """`aet head --model <repository>/digits --name digits-head`: logistic regression."""
    return build_head(HeadConfig(model=repository / ENCODER, name=HEAD))


@pytest.fixture(scope="module")
def frozen(repository, digits_dataset):
    """Embeddings of the fit rows (train + val) and the test rows by the exported encoder."""
    table = embed_in_process(repository / ENCODER, digits_dataset)
    fit_x = np.concatenate([table.part("train")[0], table.part("val")[0]])
    return fit_x, table.part("test")[0]


def test_pixels(dataset) -> np.ndarray:
    return (dataset.test.x * dataset.raw_max).astype(np.float32)


test_pixels.__test__ = False  # a helper, not a test


def graph_probabilities(version: Path, pixels: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        str(version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(["probabilities"], {"pixels": pixels})
    return probabilities


# --- aet head ---------------------------------------------------------------------------------


def test_exported_logistic_head_matches_predict_proba(head, repository, frozen, digits_dataset):
    fit_x, test_x = frozen
    tuned = tune_logistic(fit_x, digits_dataset.fit.y, seed=0)
    expected = tuned.model.predict_proba(test_x)
    got = graph_probabilities(head, test_pixels(digits_dataset))
    assert got.shape == (len(digits_dataset.test), 10)
    assert np.abs(got - expected).max() <= 1e-5

    card = read_model_card(head / "model.json")
    encoder = read_model_card(repository / ENCODER / "1" / "model.json")
    assert (card.name, card.version, card.output.name) == (HEAD, 1, "probabilities")
    assert card.classifier.labels == LABELS
    assert card.classifier.encoder == {"name": ENCODER, "version": 1, "sha256": encoder.sha256}
    assert card.classifier.head == "logreg"
    assert card.classifier.settings == {
        **tuned.settings,
        "cv_accuracy": tuned.cv_accuracy,
        "cv_folds": tuned.folds,
        "seed": 0,
    }
    assert card.dataset == digits_dataset.source  # the encoder's split, not another
    accuracy = float((expected.argmax(1) == digits_dataset.test.y).mean())
    assert card.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert accuracy >= 0.6  # a 3-epoch 8-d encoder: far above chance (0.1)
    assert card.parity_max_abs_diff <= 1e-5


def test_exported_mlp_head_matches_predict_proba(repository, frozen, digits_dataset):
    version = build_head(
        HeadConfig(model=repository / ENCODER, name="digits-mlp", head="mlp", hidden=16, steps=60)
    )
    fit_x, test_x = frozen
    mlp = fit_mlp_head(fit_x, digits_dataset.fit.y, 10, hidden=16, steps=60, seed=0)
    got = graph_probabilities(version, test_pixels(digits_dataset))
    assert np.abs(got - mlp.predict_proba(test_x)).max() <= 1e-5
    card = read_model_card(version / "model.json")
    assert card.classifier.head == "mlp" and card.classifier.settings["hidden"] == 16


def test_fine_tuned_head_is_one_graph_on_pixels(repository, digits_checkpoint, digits_dataset):
    version = build_head(
        HeadConfig(
            model=repository / ENCODER,
            name="digits-fine-tuned",
            fine_tune=digits_checkpoint.parent,
            steps=60,
        )
    )
    card = read_model_card(version / "model.json")
    assert card.classifier.head == "fine-tune" and card.parity_max_abs_diff <= 1e-5
    predicted = Classifier.load(version).classify(test_pixels(digits_dataset)).predicted
    assert card.metrics["test_accuracy"] == pytest.approx(
        float((predicted == digits_dataset.test.y).mean())
    )


def test_fine_tuning_another_run_is_refused(repository, digits_checkpoint, tmp_path):
    payload = torch.load(digits_checkpoint, weights_only=True)
    payload["model_state"] = {k: v + 0.01 for k, v in payload["model_state"].items()}
    (tmp_path / "other").mkdir()
    torch.save(payload, tmp_path / "other" / "best.pt")
    config = HeadConfig(model=repository / ENCODER, name="other", fine_tune=tmp_path / "other")
    with pytest.raises(HeadError, match="best.pt is not the encoder .* was exported from"):
        build_head(config)
    assert not (repository / "other").exists()


def test_class_labels_are_the_image_folders_names(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "emu"):
        (tmp_path / name).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset("image-folder", tmp_path, image_size=8)
    assert class_names(dataset) == ("cat", "dog", "emu")
    assert class_names(load_dataset("digits")) == LABELS


def _written(root: Path) -> list[str]:
    return sorted(f"{v.name}/{v.version}" for v in scan_repository(root))


def test_tampered_encoder_is_refused_and_nothing_written(tmp_path, model_repository):
    shutil.copytree(model_repository / ENCODER, tmp_path / ENCODER)
    with open(tmp_path / ENCODER / "1" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RepositoryError, match="sha256 mismatch"):
        build_head(HeadConfig(model=tmp_path / ENCODER, name=HEAD))
    assert not (tmp_path / HEAD).exists()


def test_data_set_without_labels_is_refused(tmp_path, model_repository):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "unlabelled.npz", x=rng.random((60, 1, 8, 8), dtype=np.float32))
    shutil.copytree(model_repository / ENCODER, tmp_path / ENCODER)
    card_path = tmp_path / ENCODER / "1" / "model.json"
    card = json.loads(card_path.read_text())
    card["dataset"] = {"name": "npz", "path": str(tmp_path / "unlabelled.npz"), "seed": 0}
    card_path.write_text(json.dumps(card))
    with pytest.raises(HeadError, match="data set npz: has no labels"):
        build_head(HeadConfig(model=tmp_path / ENCODER, name=HEAD))
    assert _written(tmp_path) == ["digits/1"]


def test_label_column_other_than_the_encoders_is_refused_and_an_unknown_one_named(
    tmp_path, model_repository
):
    rng = np.random.default_rng(0)
    rows = ["a,b,kind"] + [f"{a:.3f},{b:.3f},{k}" for a, b, k in rng.random((40, 3))]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    shutil.copytree(model_repository / ENCODER, tmp_path / ENCODER)
    card_path = tmp_path / ENCODER / "1" / "model.json"
    card = json.loads(card_path.read_text())
    table = {"path": str(tmp_path / "table.csv"), "seed": 0, "label_column": "kind"}
    card["dataset"] = {"name": "csv", **table}
    card_path.write_text(json.dumps(card))
    config = HeadConfig(model=tmp_path / ENCODER, name=HEAD, data=DataSpec(label_column="nope"))
    with pytest.raises(SplitMismatch, match=r"--label-column nope \(pretraining: kind\); the"):
        build_head(config)
    with pytest.raises(DataError, match="label column 'nope' not found; columns: a, b, kind"):
        build_head(dataclasses.replace(config, allow_split_mismatch=True))
    assert _written(tmp_path) == ["digits/1"]


def test_cli_refuses_a_split_other_than_the_encoders(repository, capsys):
    argv = ["head", "--model", str(repository / ENCODER), "--name", "other", "--seed", "3"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "split differs from pretraining: --seed 3 (pretraining: 0)" in error
    assert "pass --allow-split-mismatch" in error
    assert not (repository / "other").exists()


def test_head_cannot_take_the_encoders_name(repository):
    with pytest.raises(HeadError, match="name: expected a model name other than the encoder's"):
        build_head(HeadConfig(model=repository / ENCODER, name=ENCODER))
    assert [v.version for v in scan_repository(repository) if v.name == ENCODER] == [1]


# --- serving and clients --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(repository, head):
    live = start_kserve_server(repository, max_batch_size=64, max_request_rows=100)
    yield live
    live.stop()


def test_served_classification_equals_local_and_the_graph(server, head, digits_dataset):
    pixels = test_pixels(digits_dataset)
    local = Classifier.load(head.parent).classify(pixels, top_k=3)
    with EmbeddingClient(server.target) as client:
        served = client.classify(pixels, HEAD, top_k=3)  # 540 rows: 6 requests of <= 100
        description = client.describe(HEAD)
    assert tuple(description.class_labels) == LABELS
    np.testing.assert_allclose(served.probabilities, graph_probabilities(head, pixels), atol=1e-6)
    np.testing.assert_array_equal(served.indices, local.indices)
    np.testing.assert_array_equal(served.labels, local.labels)
    np.testing.assert_allclose(served.scores, local.scores, atol=1e-6)
    assert (served.scores[:, 0] >= served.scores[:, 1]).all()
    assert served.labels[0, 0] == LABELS[served.indices[0, 0]]


@pytest.mark.parametrize(
    ("model", "top_k", "message"),
    [
        (HEAD, 11, "top_k: expected 1 to 10 (the classes), got 11"),
        (HEAD, -2, "top_k: expected 1 to 10 (the classes), got -2"),
        (ENCODER, 1, "model: expected a classifier model"),
    ],
)
def test_bad_classify_requests_are_invalid_argument(server, digits_dataset, model, top_k, message):
    with EmbeddingClient(server.target) as client, pytest.raises(EmbeddingError) as caught:
        client.classify(test_pixels(digits_dataset)[:4], model, top_k=top_k)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details


def test_kserve_class_count_zero_is_invalid_argument(server, digits_dataset):
    pixels = test_pixels(digits_dataset)[:2]
    request = pb.ModelInferRequest(
        model_name=HEAD,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=pixels.shape
            )
        ],
        raw_input_contents=[pixels.tobytes()],
        outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities",
                parameters={"classification": pb.InferParameter(int64_param=0)},
            )
        ],
    )
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        kserve_stub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "outputs[0].parameters['classification'] (class_count): expected 1 to 10 (the classes), "
        "got 0"
    )


TRITONCLIENT_CLASSIFICATION = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, pixels_file = sys.argv[1:]
client = tc.InferenceServerClient(target)
pixels = np.load(pixels_file)

def infer(model, output):
    tensor = tc.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return client.infer(model, [tensor], outputs=[output])

report = {"metadata": client.get_model_metadata("digits-head", as_json=True)}
top3 = infer("digits-head", tc.InferRequestedOutput("probabilities", class_count=3))
report["top3"] = [[element.decode() for element in row] for row in top3.as_numpy("probabilities")]
plain = infer("digits-head", tc.InferRequestedOutput("probabilities"))
report["probabilities"] = plain.as_numpy("probabilities").tolist()
report["errors"] = {}
for case, (model, count) in {"negative": ("digits-head", -1), "too many": ("digits-head", 11),
                             "encoder": ("digits", 2)}.items():
    output = tc.InferRequestedOutput("probabilities" if model != "digits" else "embedding",
                                     class_count=count)
    try:
        infer(model, output)
        report["errors"][case] = ["OK", ""]
    except InferenceServerException as exc:
        report["errors"][case] = [exc.status(), exc.message()]
print(json.dumps(report))
"""


def test_tritonclient_classification_extension(server, head, digits_dataset, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:  # never imported here: see test_kserve
        pytest.skip("tritonclient missing: pip install --no-deps tritonclient==2.51.0")
    pixels = test_pixels(digits_dataset)[:5]
    np.save(tmp_path / "pixels.npy", pixels)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITONCLIENT_CLASSIFICATION,
            server.target,
            str(tmp_path / "pixels.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["metadata"]["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}
    ]
    expected = Classifier.load(head.parent).classify(pixels, top_k=3)
    for row, answers in enumerate(report["top3"]):
        fields = [answer.split(":") for answer in answers]
        assert [int(index) for _, index, _ in fields] == expected.indices[row].tolist()
        assert [label for _, _, label in fields] == expected.labels[row].tolist()
        np.testing.assert_allclose(
            [float(s) for s, _, _ in fields], expected.scores[row], atol=1e-6
        )
    np.testing.assert_allclose(report["probabilities"], expected.probabilities, atol=1e-6)
    errors = report["errors"]
    assert errors["negative"] == [
        "StatusCode.INVALID_ARGUMENT",
        "outputs[0].parameters['classification'] (class_count): expected 1 to 10 (the classes), "
        "got -1",
    ]
    assert (
        errors["too many"][0] == "StatusCode.INVALID_ARGUMENT" and "got 11" in errors["too many"][1]
    )
    assert errors["encoder"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "expected a classifier model" in errors["encoder"][1]


# --- aet predict ----------------------------------------------------------------------------


def test_predict_local_resumes_and_matches_the_server(server, head, tmp_path, digits_dataset):
    local = PredictConfig(
        local=head.parent,
        output=tmp_path / "local.parquet",
        batch_size=100,
        shard_size=300,
        progress=False,
    )
    with pytest.raises(Interrupted), InterruptedAfter(head.parent, blocks=7) as backend:
        predict(local, backend)
    shards = tmp_path / "local.probabilities.npz.shards"
    assert sorted(p.name for p in shards.glob("shard-*.npz")) == [
        "shard-00000.npz",
        "shard-00001.npz",
    ]
    assert not local.output.exists()
    with LocalBackend(head.parent) as backend:
        resumed = predict(local, backend)
    assert not shards.exists() and not (tmp_path / "local.probabilities.npz").exists()

    argv = ["predict", "--server", server.target, "--model", HEAD, "--output",
            str(tmp_path / "served.npz"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    served = read_predictions(tmp_path / "served.npz")
    read_back = read_predictions(local.output)
    for predictions in (served, read_back):
        np.testing.assert_array_equal(
            predictions.classification.predicted, resumed.classification.predicted
        )
        np.testing.assert_allclose(
            predictions.classification.probabilities,
            resumed.classification.probabilities,
            atol=1e-6,
        )
    card = read_model_card(head / "model.json")
    assert served.accuracy("test") == pytest.approx(card.metrics["test_accuracy"])
    assert served.metadata["model"]["class_labels"] == list(LABELS)
    assert set(served.split) == {"train", "val", "test"}


def test_predict_refuses_an_encoder(repository, tmp_path, capsys):
    argv = ["predict", "--local", str(repository / ENCODER), "--output", str(tmp_path / "p.npz")]
    assert main(argv) == 2
    assert (
        "expected a classifier (aet head) with class labels, got an encoder"
        in capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())
