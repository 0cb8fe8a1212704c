"""`aet export`: ONNX graph, parity with PyTorch, model card, failures that write nothing."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.neighbors import LocalOutlierFactor

from aet.cli import main
from aet.config import ConfigError
from aet.repository import ModelCard, read_model_card, scan_repository
from aet.training import export as export_module
from aet.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from aet.training.data import Dataset, Split, load_dataset
from aet.training.export import (
    PARITY_ROWS,
    ExportConfig,
    ExportedEncoder,
    ExportError,
    Scale,
    export,
    max_parity_diffs,
    onnx_session,
    parity_rows,
    to_onnx,
    training_recipe,
)
from aet.training.models import ModelConfig, build_autoencoder

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_SIZE = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real `aet pretrain` run: a tiny MLP autoencoder trained two epochs on digits."""
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("runs")
    status = main(
        [
            "pretrain",
            "--runs-dir",
            str(runs),
            "--name",
            "tiny",
            "--architecture",
            "mlp",
            "--hidden-sizes",
            "16",
            "--code-size",
            str(CODE_SIZE),
            "--noise",
            "none",
            "--epochs",
            "2",
            "--no-progress",
            "--probe-labels",
            "100",
        ]
    )
    assert status == 0
    return runs / "tiny"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("exported")
    return export(ExportConfig(run=run_dir, repository=repository))


def digits_pixels(rows: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:rows, None].astype(np.float32)  # (rows, 1, 8, 8) in [0, 16]


def test_export_writes_version_one_with_a_complete_card(exported, run_dir):
    assert exported.name == "1" and exported.parent.name == "tiny"
    card = read_model_card(exported / "model.json")
    assert card.sha256 == hashlib.sha256((exported / "model.onnx").read_bytes()).hexdigest()
    checkpoint = load_checkpoint(run_dir / "best.pt")
    evaluation = checkpoint.metrics["evaluation"]
    assert (card.name, card.version, card.architecture) == ("tiny", 1, "mlp")
    assert card.hyperparameters == {
        **checkpoint.model_config.to_dict(),
        "training": training_recipe(checkpoint.run_config),
    }
    assert card.hyperparameters["training"]["noise"] == checkpoint.run_config["noise"]
    assert card.hyperparameters["training"]["augment_translate"] == 0.0
    assert (card.input.name, card.input.shape, card.input.dtype) == ("pixels", (1, 8, 8), "float32")
    assert card.input.value_range == (0.0, 16.0)
    assert (card.output.name, card.output.dtype, card.output.embedding_dim) == (
        "embedding",
        "float32",
        CODE_SIZE,
    )
    assert card.preprocessing == ["scale: pixels / 16 -> [0, 1]", "flatten: (1, 8, 8) -> 64"]
    assert card.input.feature_names is None and card.standardizer is None
    score = card.score
    assert (score.name, score.dtype, score.calibration_split) == (
        "reconstruction_error",
        "float32",
        "val",
    )
    assert score.measure.startswith("mean squared difference per pixel")
    assert "Gaussian smoothing of the difference (sigma 0.286 pixels)" in score.measure
    assert "local outlier factor of the code among the training codes (5 neighbours" in (
        score.measure
    )
    assert score.calibration_rows == 126
    assert score.calibration_file == "calibration.npy" and score.calibration_sha256 is not None
    levels = list(score.percentiles.values())
    assert list(score.percentiles) == ["p50", "p90", "p99", "p99.9"] and levels == sorted(levels)
    assert card.dataset == checkpoint.source and card.dataset["sizes"]["test"] == 540
    assert card.metrics == {
        "test_reconstruction_mse": evaluation["reconstruction_mse"]["model"],
        "test_pca_reconstruction_mse": evaluation["reconstruction_mse"]["pca"],
        "probe_accuracy_100_labels": evaluation["probe"]["accuracy"]["model"]["logreg"][0],
        "probe_accuracy_1257_labels": evaluation["probe"]["accuracy"]["model"]["logreg"][1],
        "knn_accuracy_100_labels": evaluation["probe"]["accuracy"]["model"]["knn"][0],
        "knn_accuracy_1257_labels": evaluation["probe"]["accuracy"]["model"]["knn"][1],
    }
    assert card.opset == 20
    assert 0 <= card.parity_max_abs_diff <= 1e-4 and card.parity_samples == PARITY_ROWS
    assert set(card.library_versions) == {"torch", "onnx", "onnxscript", "onnxruntime", "numpy"}
    assert card.library_versions["torch"] == torch.__version__.split("+")[0]
    json_fields = json.loads((exported / "model.json").read_text())
    # every field but `classifier`, which only classifier heads (aet head) carry
    assert set(json_fields) == {f.name for f in dataclasses.fields(ModelCard)} - {"classifier"}
    assert [(v.name, v.version, v.status) for v in scan_repository(exported.parents[1])] == [
        ("tiny", 1, "ok")
    ]


def test_graph_is_small_with_a_dynamic_batch_and_matches_pytorch(exported, run_dir):
    graph = onnx.load(exported / "model.onnx")
    onnx.checker.check_model(graph, full_check=True)
    (pixels_input,), outputs = graph.graph.input, graph.graph.output
    assert pixels_input.name == "pixels"
    assert [o.name for o in outputs] == ["embedding", "reconstruction_error"]
    dims = pixels_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert b"/work/" not in (exported / "model.onnx").read_bytes()  # no local paths leak

    model = load_checkpoint(run_dir / "best.pt").build_model()
    session = onnxruntime.InferenceSession(
        str(exported / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    pixels = digits_pixels(41)
    scaled = torch.from_numpy(pixels / 16.0)  # the graph's input is raw pixels: the model's / 16
    with torch.no_grad():
        expected = model.encode(scaled).numpy()
    # The score by hand (training.novelty's definition, recomputed with scipy): the mean
    # square of the difference between pixels and reconstruction, smoothed by a Gaussian of
    # 8 / 28 pixels (zero beyond the image, the kernel cut one pixel out), plus scikit-learn's
    # local outlier factor of the code among the training codes (5 neighbours), each
    # standardised on the training rows (leave-one-out there).
    train = torch.from_numpy(np.asarray(load_dataset("digits").train.x))

    def smoothed_error(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            difference = (x - torch.sigmoid(model(x))).double().numpy()[:, 0]  # (B, 8, 8)
        sigma = 8 / 28
        smoothed = np.stack(
            [gaussian_filter(d, sigma, mode="constant", truncate=1 / sigma) for d in difference]
        )
        return np.square(smoothed).reshape(len(x), -1).mean(1)

    with torch.no_grad():
        train_codes = model.encode(train).double().numpy()
    factor = LocalOutlierFactor(n_neighbors=5, novelty=True).fit(train_codes)
    density, train_density = -factor.score_samples(expected), -factor.negative_outlier_factor_
    train_error = smoothed_error(train)
    expected_score = (smoothed_error(scaled) - train_error.mean()) / train_error.std(ddof=1) + (
        density - train_density.mean()
    ) / train_density.std(ddof=1)
    for batch in (1, 5, 35):
        got, score = session.run(None, {"pixels": pixels[:batch]})
        assert got.shape == (batch, CODE_SIZE) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4, rtol=0)
        assert score.shape == (batch,) and score.dtype == np.float32
        np.testing.assert_allclose(score, expected_score[:batch], rtol=1e-3, atol=1e-3)


def test_a_score_on_the_first_hidden_layer_exports_with_parity(exported, run_dir, tmp_path):
    """`--score-layer hidden`: the graph keeps the training rows' first hidden layers (16
    units here) for the density term; export's parity check passes, model.json says what the
    term measures, the embedding is the code-layer version's while the score is not, and the
    layer is computed once."""
    version = export(
        ExportConfig(run=run_dir, repository=tmp_path / "exported", score_layer="hidden")
    )
    score = read_model_card(version / "model.json").score
    assert "local outlier factor of the encoder's first hidden layer among the training rows'" in (
        score.measure
    )
    pixels = digits_pixels(9)
    outputs = [
        onnxruntime.InferenceSession(
            str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
        ).run(None, {"pixels": pixels})
        for folder in (version, exported)
    ]
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], atol=1e-6)
    assert np.isfinite(outputs[0][1]).all() and not np.allclose(outputs[0][1], outputs[1][1])
    # The graph computes the first hidden layer once, for the code and the density term alike
    # (the server's request path gains the reference distances, not a second layer).
    layers = [
        sum(node.op_type == "Gemm" for node in onnx.load(folder / "model.onnx").graph.node)
        for folder in (version, exported)
    ]
    assert layers[0] == layers[1]


@pytest.mark.parametrize("architecture, hidden_sizes", [("vae", (16,)), ("conv", (4, 8))])
def test_vae_and_conv_encoders_export_with_parity(architecture, hidden_sizes):
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture=architecture, hidden_sizes=hidden_sizes, code_size=3), (1, 8, 8)
    ).eval()
    encoder = ExportedEncoder(model, Scale(16.0)).eval()
    pixels = digits_pixels(64)
    graph = to_onnx(encoder, torch.from_numpy(pixels[:2]), opset=20)
    diffs = max_parity_diffs(onnx_session(graph.SerializeToString()), encoder, pixels)
    assert diffs.keys() == {"embedding", "reconstruction_error"} and max(diffs.values()) <= 1e-4
    if architecture == "vae":  # the embedding is the posterior mean, not a sample
        session = onnxruntime.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        with torch.no_grad():
            mu, _ = model.posterior(torch.from_numpy(pixels / 16.0))
        np.testing.assert_allclose(session.run(None, {"pixels": pixels})[0], mu.numpy(), atol=1e-5)


def test_parity_failure_reports_the_diff_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    # A negative tolerance fails any difference, exact agreement included.
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(
        ExportError,
        match=r"parity check failed: over 1000 inputs, .*'embedding': "
        r"expected <= -1, got [0-9.e+-]+; .*'reconstruction_error' .*; nothing written",
    ):
        export(ExportConfig(run=run_dir, repository=tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()


def test_diverged_weights_fail_and_write_nothing(run_dir, tmp_path):
    checkpoint = load_checkpoint(run_dir / "best.pt")
    checkpoint.model_state = {
        k: torch.full_like(v, float("nan")) for k, v in checkpoint.model_state.items()
    }
    save_checkpoint(tmp_path / "nan.pt", checkpoint)
    with pytest.raises(ExportError, match="NaN or Inf for 1000 of 1000 inputs"):
        export(
            ExportConfig(
                checkpoint=tmp_path / "nan.pt", model="nan", repository=tmp_path / "exported"
            )
        )
    assert not (tmp_path / "exported").exists()


def test_parity_inputs_take_held_out_rows_first_and_top_up_small_data_sets():
    def split(n: int, value: float) -> Split:
        return Split(np.full((n, 1, 2, 2), value, np.float32), None)

    small = Dataset(
        name="tiny",
        train=split(5, 0.25),
        val=split(2, 0.5),
        test=split(3, 1.0),
        raw_max=255.0,
        image_shape=(1, 2, 2),
        num_classes=None,
        source={},
    )
    pixels = parity_rows(small, rows=40)
    assert pixels.shape == (40, 1, 2, 2) and pixels.dtype == np.float32
    assert pixels[:10, 0, 0, 0].tolist() == [255.0] * 3 + [127.5] * 2 + [63.75] * 5
    noise = pixels[10:]
    assert noise.min() >= 0 and noise.max() <= 255 and len(np.unique(noise)) == noise.size
    np.testing.assert_array_equal(parity_rows(small, rows=40), pixels)  # seeded
    np.testing.assert_array_equal(parity_rows(small, rows=4), pixels[:4])


def test_graph_onnxruntime_cannot_load_is_an_export_error():
    with pytest.raises(ExportError, match="onnxruntime .* cannot load the exported graph"):
        onnx_session(b"not an onnx graph")


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint at all"])
def test_missing_or_corrupt_checkpoint_fails_cleanly(tmp_path, content):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}"):
        export(ExportConfig(checkpoint=path, model="digits", repository=tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()


def test_truncated_checkpoint_fails_cleanly(run_dir, tmp_path):
    data = (run_dir / "best.pt").read_bytes()
    (tmp_path / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        export(
            ExportConfig(
                checkpoint=tmp_path / "best.pt",
                model="digits",
                repository=tmp_path / "exported",
            )
        )
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "give exactly one of --run or --checkpoint"),
        ({"run": Path("r"), "checkpoint": Path("c")}, "give exactly one of --run or --checkpoint"),
        ({"checkpoint": Path("c")}, "model: required with --checkpoint"),
        ({"run": Path("r"), "model": "../up"}, "model: expected .*; got '../up'"),
        ({"run": Path("r"), "opset": 17}, "opset: expected 18 .* to \\d+ .*; got 17"),
        ({"run": Path("r"), "opset": 99}, "opset: expected 18 .* to \\d+ .*; got 99"),
    ],
)
def test_invalid_config_is_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**fields)


def run_aet_export(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "proto")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "aet.training", "export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_aet_export_subprocess_adds_version_two_with_identical_bytes(exported, run_dir):
    repository = exported.parents[1]
    first = (exported / "model.onnx").read_bytes()
    result = run_aet_export("--run", str(run_dir), "--repository", str(repository))
    assert result.returncode == 0, result.stderr
    assert f"-> {repository / 'tiny' / '2'}" in result.stdout
    assert "over 1000 inputs" in result.stdout
    assert (exported / "model.onnx").read_bytes() == first  # version 1 untouched
    assert (repository / "tiny" / "2" / "model.onnx").read_bytes() == first  # reproducible
    assert [(v.version, v.status) for v in scan_repository(repository)] == [(1, "ok"), (2, "ok")]


def test_aet_export_subprocess_reports_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"\x00" * 64)
    result = run_aet_export(
        "--checkpoint",
        str(tmp_path / "best.pt"),
        "--model",
        "digits",
        "--repository",
        str(tmp_path / "exported"),
    )
    assert result.returncode == 2
    assert (
        f"aet export: error: checkpoint {tmp_path / 'best.pt'}: not a readable checkpoint"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "exported").exists()
