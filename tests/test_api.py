"""The public Python API: `aet.Encoder`, `aet.AutoencoderEmbedder` (scikit-learn), lazy exports."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIGITS_MODEL
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

import aet
from aet import AutoencoderEmbedder, EmbeddingClient, Encoder
from aet.errors import UserError
from aet.repository import read_model_card

# Tiny enough that each of scikit-learn's ~47 checks (each fits at least once) takes well
# under a second; overcomplete codes are allowed because some checks fit on one feature.
SMALL = dict(
    architecture="mlp",
    hidden_sizes=(4,),
    code_size=2,
    epochs=2,
    patience=2,
    batch_size=16,
    allow_overcomplete=True,
)


def _expected_failed_checks(estimator) -> dict[str, str]:
    return {}  # every check applies and passes; kept explicit for the next reader


@parametrize_with_checks(
    [AutoencoderEmbedder(**SMALL)], expected_failed_checks=_expected_failed_checks
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_digits_pipeline_cross_validates_above_the_floor():
    X, y = load_digits(return_X_y=True)
    pipeline = Pipeline(
        [
            (
                "ae",
                AutoencoderEmbedder(
                    architecture="mlp",
                    hidden_sizes=(64,),
                    code_size=16,
                    epochs=15,
                    patience=5,
                    noise="none",
                ),
            ),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    )
    scores = cross_val_score(pipeline, X, y, cv=3)
    assert scores.mean() >= 0.85, scores


@pytest.mark.parametrize("loss", ["mse", "gaussian"])
def test_embedder_standardises_any_scale_and_refuses_bce_outside_unit_interval(loss):
    rng = np.random.default_rng(0)
    X = rng.normal(-300.0, 50.0, size=(60, 5))
    embedder = AutoencoderEmbedder(**{**SMALL, "loss": loss}).fit(X)
    assert embedder.n_features_in_ == 5 and embedder.embedding_dim_ == 2
    np.testing.assert_allclose(embedder.standardizer_.mean, X.mean(axis=0), rtol=1e-5)
    assert set(embedder.history_) == {"train"}
    codes = embedder.transform(X)
    assert codes.dtype == np.float32 and codes.shape == (60, 2) and np.isfinite(codes).all()
    assert (embedder.model_.log_variance is not None) == (loss == "gaussian")
    with pytest.raises(ValueError, match=r"loss='bce' needs features in \[0, 1\]"):
        AutoencoderEmbedder(**{**SMALL, "loss": "bce"}).fit(X)
    with pytest.raises(ValueError, match="architecture: 'conv' needs images"):
        AutoencoderEmbedder(architecture="conv").fit(X)
    with pytest.raises(ValueError, match="code_size: expected fewer than the 5 inputs"):
        AutoencoderEmbedder(**{**SMALL, "allow_overcomplete": False, "code_size": 5}).fit(X)


def test_embedder_on_flattened_images_smooths_its_score_and_exports_it(tmp_path):
    """image_shape (1, 8, 8) on digits rows: the score smooths (sigma 8 / 28 pixels), the
    exported graph computes the same scores, and a shape that does not fit is refused."""
    X = load_digits().data[:300] / 16.0
    params = {**SMALL, "hidden_sizes": (16,), "code_size": 4, "loss": "bce"}
    embedder = AutoencoderEmbedder(**params, image_shape=(1, 8, 8)).fit(X)
    assert embedder.novelty_.sigma == pytest.approx(8 / 28)
    flat = AutoencoderEmbedder(**params).fit(X)
    assert flat.novelty_.sigma == 0 and flat.novelty_.kernel is None
    assert not np.allclose(embedder.novelty_score(X), flat.novelty_score(X))
    encoder = Encoder.load(embedder.export(tmp_path, "images"), threads=1)
    assert "sigma 0.286 pixels" in encoder.card["score"]["measure"]
    served = -encoder.score_samples(X.astype(np.float32))
    np.testing.assert_allclose(served, embedder.novelty_score(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(
        ValueError,
        match=r"image_shape: expected \(channels, height, width\) "
        r"whose product is X's 64 features; got \(1, 8, 7\)",
    ):
        AutoencoderEmbedder(**params, image_shape=(1, 8, 7)).fit(X)


@pytest.fixture(scope="module")
def exported_embedder(tmp_path_factory):
    """An embedder fitted on digits pixels (0..16, standardised) and exported as `vectors/1`."""
    X = load_digits().data[:400]
    embedder = AutoencoderEmbedder(**{**SMALL, "hidden_sizes": (16,), "code_size": 4}).fit(X)
    root = tmp_path_factory.mktemp("exported")
    return embedder, X, embedder.export(root, "vectors")


def test_exported_embedder_loads_as_an_encoder_with_the_same_codes(exported_embedder):
    embedder, X, version_dir = exported_embedder
    card = read_model_card(version_dir / "model.json")
    assert card.input.shape == (64,) and card.output.embedding_dim == 4
    assert card.preprocessing[0].startswith("standardize")
    encoder = Encoder.load(version_dir.parent)
    assert (encoder.name, encoder.version, encoder.input_shape) == ("vectors", 1, (64,))
    np.testing.assert_allclose(encoder.transform(X), embedder.transform(X), atol=1e-4)


def test_exported_embedder_is_served(exported_embedder, start_server):
    embedder, X, version_dir = exported_embedder
    server = start_server(version_dir.parent.parent)
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        served = client.embed(X.astype(np.float32), "vectors")
    np.testing.assert_allclose(served, embedder.transform(X), atol=1e-4)


def test_encoder_takes_any_numeric_dtype_and_the_shapes_that_fit(model_repository):
    encoder = Encoder.load(model_repository / DIGITS_MODEL, device="cpu")
    assert encoder.input_shape == (1, 8, 8) and encoder.value_range == (0.0, 16.0)
    assert encoder.card["name"] == DIGITS_MODEL and encoder.provider == "CPUExecutionProvider"
    images = load_digits().images[:50]  # (50, 8, 8) float64 in 0..16
    expected = encoder.transform(images[:, None].astype(np.float32))  # (N, C, H, W) float32
    assert expected.dtype == np.float32 and expected.shape == (50, encoder.embedding_dim)
    for variant in (
        images,  # (N, H, W) float64
        images.reshape(50, 64).astype(np.int64),  # (N, D) int64
        images[:, None].astype(np.uint8),
        images.astype(np.float16),
    ):
        np.testing.assert_allclose(encoder.transform(variant), expected, atol=1e-5)
    assert encoder.transform(np.zeros((0, 64))).shape == (0, encoder.embedding_dim)


def test_encoder_errors_name_what_was_expected(model_repository):
    encoder = Encoder.load(model_repository / DIGITS_MODEL, version=1)
    with pytest.raises(
        ValueError,
        match=r"X shape: expected \(N, 1, 8, 8\) or \(N, 8, 8\) or "
        r"\(N, 64\) for model digits v1; got \(3, 7\)",
    ):
        encoder.transform(np.zeros((3, 7)))
    with pytest.raises(TypeError, match="X dtype: expected a real numeric dtype; got <U1"):
        encoder.transform(np.full((2, 64), "a"))
    with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or Inf"):
        encoder.transform(np.array([[np.nan] * 64, [0.0] * 64]))
    with pytest.raises(UserError, match="no such folder"):
        Encoder.load(model_repository / "nope")
    with pytest.raises(
        UserError, match=r"version: model folder .*digits has no version 9; found versions \[1\]"
    ):
        Encoder.load(model_repository / DIGITS_MODEL, version=9)
    with pytest.raises(UserError, match="device: expected one of auto, cpu, cuda"):
        Encoder.load(model_repository / DIGITS_MODEL, device="tpu")


def test_importing_aet_loads_neither_torch_nor_grpc():
    code = "import sys, aet; assert 'torch' not in sys.modules and 'grpc' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(aet.__all__) == {"Encoder", "EmbeddingClient", "AutoencoderEmbedder", "Classifier"}


def test_client_follows_a_hot_reload_to_a_latest_version_with_another_input_shape(
    exported_embedder, model_repository, tmp_path, start_server
):
    from aet.server.reload import RepositoryReloader

    embedder, X, _ = exported_embedder
    root = tmp_path / "exported"
    shutil.copytree(model_repository, root)
    server = start_server(root)
    images = load_digits().images[:20]  # (20, 8, 8) float64 holding integers 0..16
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        first = client.embed(images[:, None], DIGITS_MODEL)  # float64 cast losslessly
        assert first.shape == (20, 8) and client.describe(DIGITS_MODEL).version == 1
        embedder.export(root, DIGITS_MODEL)  # digits/2 takes (64,) rows, 4-d codes
        RepositoryReloader(server.registry, root).sync()
        second = client.embed(X[:20], DIGITS_MODEL)  # the same client, the new latest
        models = client.list_models()
    np.testing.assert_allclose(second, embedder.transform(X[:20]), atol=1e-4)
    assert [(m.name, m.latest_version) for m in models] == [(DIGITS_MODEL, 2)]
    assert [(v.version, v.state) for v in models[0].versions] == [(1, "READY"), (2, "READY")]
