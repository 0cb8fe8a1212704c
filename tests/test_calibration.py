"""The novelty score's parts (`training.novelty`), its calibration file and conformal p-values
(`aet.conformal`), and scikit-learn's novelty conventions on `aet.Encoder` and
`aet.AutoencoderEmbedder`.

Validity is checked on real held-out normal rows: the shipped digits encoder on the digits
test split, and an embedder fitted on breast-cancer rows."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.neighbors import LocalOutlierFactor

from aet.conformal import p_values, threshold
from aet.encoder import Encoder
from aet.errors import UserError
from aet.repository import CALIBRATION_FILE, read_model_card
from aet.sklearn import AutoencoderEmbedder
from aet.training import novelty
from aet.training.data import load_dataset
from aet.training.models import ModelConfig, build_autoencoder
from aet.training.novelty import (
    MahalanobisDistance,
    NoveltyScore,
    OutlierFactor,
    ScoreSettings,
    local_outlier_factor,
    nearest,
    reconstruction_term,
    reference_neighbourhoods,
    smoothing_kernel,
    squared_distances,
    stroke_sigma,
)

SHIPPED = Path(__file__).resolve().parents[1] / "exported" / "digits"
ALPHAS = (0.01, 0.05, 0.1)


def test_the_smoothed_term_is_zero_for_a_perfect_reconstruction_and_forgives_a_shift():
    """A stroke drawn one pixel to the side and a stroke missing cost the same squared error
    pixel by pixel; smoothed (sigma 1 pixel at 28 a side), the shift costs less than half."""
    shape = (1, 28, 28)
    image = torch.zeros(1, *shape)
    image[..., 4:24, 10:12] = 1.0  # a vertical stroke two pixels wide
    shifted = torch.roll(image, 1, dims=-1)
    missing = torch.zeros_like(image)
    kernel = smoothing_kernel(stroke_sigma(shape), 1)
    assert stroke_sigma(shape) == 1.0 and kernel.shape == (1, 1, 7, 7)

    def term(reconstruction: torch.Tensor, kernel: torch.Tensor | None) -> float:
        return float(reconstruction_term(reconstruction, image, "mse", shape, kernel)[0])

    assert term(image, kernel) == 0 and term(image, None) == 0
    assert term(shifted, None) == pytest.approx(term(missing, None))
    assert term(shifted, kernel) < 0.5 * term(missing, kernel)  # measured: 0.36 of it
    logits = torch.logit(image.clamp(1e-6, 1 - 1e-6))  # bce: the decoder's mean is the sigmoid
    assert float(reconstruction_term(logits, image, "bce", shape, kernel)[0]) < 1e-8
    vectors = torch.rand(4, 13, generator=torch.Generator().manual_seed(0))
    assert stroke_sigma((13,)) == 0.0
    np.testing.assert_allclose(
        reconstruction_term(vectors + 1, vectors, "mse", (13,)).numpy(), 1.0, rtol=1e-6
    )


def test_the_density_term_is_scikit_learns_local_outlier_factor():
    """Two clusters of different spreads: the factor is scikit-learn's, about 1 inside either
    cluster, and it judges a distance by the cluster's spread: 0.6 off the wide cluster's
    centre is inside it, 0.6 off the tight one's is far outside."""
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(0, 1, (100, 4)), rng.normal(5, 0.1, (50, 4))])
    queries = np.concatenate([rng.normal(0, 1, (5, 4)), rng.normal(5, 0.1, (5, 4))])
    queries = np.concatenate([queries, [[0.6, 0, 0, 0], [5.6, 5, 5, 5]]])
    k_distance, density = reference_neighbourhoods(torch.from_numpy(reference), 5)
    distances, index = nearest(
        squared_distances(torch.from_numpy(queries), torch.from_numpy(reference)), 5
    )
    ours = local_outlier_factor(distances, index, k_distance, density).numpy()
    sklearn = LocalOutlierFactor(n_neighbors=5, novelty=True).fit(reference)
    np.testing.assert_allclose(ours, -sklearn.score_samples(queries), rtol=1e-6)
    np.testing.assert_allclose(density.numpy(), sklearn._lrd, rtol=1e-6)
    assert np.median(ours[:10]) < 1.2 and ours[10] < 1.2 and ours[11] > 3


def test_a_large_training_set_keeps_a_seeded_sample_of_codes_and_scales_by_all_rows(
    monkeypatch,
):
    """Beyond MAX_REFERENCE_ROWS training rows the graph keeps a seeded sample of codes; the
    density term's scale comes from every training row: a sampled row's factor leaves itself
    out, the others' are plain queries (both scikit-learn's)."""
    monkeypatch.setattr(novelty, "MAX_REFERENCE_ROWS", 40)
    torch.manual_seed(0)
    model = build_autoencoder(  # images (2 x 3 pixels): the density term is the factor
        ModelConfig(architecture="mlp", hidden_sizes=(8,), code_size=3, loss="bce"), (1, 2, 3)
    )
    rows = np.random.default_rng(0).uniform(size=(100, 1, 2, 3)).astype(np.float32)
    score = NoveltyScore.fit(model, rows, ScoreSettings(neighbours=5), seed=3)
    with torch.no_grad():
        codes = model.eval().encode(torch.from_numpy(rows)).double().numpy()
    keep = np.sort(np.random.default_rng(3).choice(100, 40, False))
    assert isinstance(score.density, OutlierFactor)
    np.testing.assert_allclose(score.density.reference.numpy(), codes[keep], rtol=1e-6)
    factor = LocalOutlierFactor(n_neighbors=5, novelty=True).fit(codes[keep])
    expected = -factor.score_samples(codes)
    expected[keep] = -factor.negative_outlier_factor_
    np.testing.assert_allclose(
        score.scales[1].numpy(), [expected.mean(), expected.std(ddof=1)], rtol=1e-4
    )


def test_the_density_term_can_read_the_encoders_first_hidden_layer():
    """With layer="hidden" the density term is scikit-learn's local outlier factor of the
    first hidden layer's activations (ReLU(W x + b), numpy by hand) among the training rows'
    (each training row leaving itself out), and the score sums it with the reconstruction term
    as it does the code's."""
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture="mlp", hidden_sizes=(16,), code_size=2, loss="bce"), (1, 3, 3)
    ).eval()
    rng = np.random.default_rng(0)
    rows = rng.uniform(size=(60, 1, 3, 3)).astype(np.float32)
    queries = rng.uniform(size=(7, 1, 3, 3)).astype(np.float32)
    score = NoveltyScore.fit(model, rows, ScoreSettings(neighbours=4, layer="hidden"), seed=0)
    assert isinstance(score.density, OutlierFactor) and score.density.reference.shape == (60, 16)
    assert "local outlier factor of the encoder's first hidden layer among the training rows'" in (
        score.measure
    )
    layer = model.encoder_layers[0]
    weight, bias = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()

    def hidden(x: np.ndarray) -> np.ndarray:
        return np.maximum(x.reshape(len(x), -1) @ weight.T + bias, 0)

    factor = LocalOutlierFactor(n_neighbors=4, novelty=True).fit(hidden(rows))
    training = -factor.negative_outlier_factor_
    np.testing.assert_allclose(
        score.scales[1].numpy(), [training.mean(), training.std(ddof=1)], rtol=1e-4
    )
    with torch.no_grad():
        x = torch.from_numpy(queries)
        recon = score.reconstruction(x, model.encode(x)).numpy()
        served = score(x)[1].numpy()
    (r_mean, r_std), (d_mean, d_std) = score.scales.numpy()
    expected = (recon - r_mean) / r_std + (-factor.score_samples(hidden(queries)) - d_mean) / d_std
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_the_density_term_reads_a_hidden_layer_of_fully_connected_encoders_only():
    """layer="hidden" needs a fully connected encoder: a ConfigError naming the setting and the
    architecture; an unknown layer is refused by the score and by the embedder before it
    trains."""
    conv = build_autoencoder(
        ModelConfig(architecture="conv", hidden_sizes=(4,), code_size=2, loss="bce"), (1, 8, 8)
    )
    rows = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(UserError, match="score_layer: 'hidden' .* got architecture 'conv'"):
        NoveltyScore.fit(conv, rows, ScoreSettings(layer="hidden"))
    with pytest.raises(UserError, match="score_layer: expected one of code, hidden; got 'deep'"):
        NoveltyScore.fit(conv, rows, ScoreSettings(layer="deep"))
    embedder = AutoencoderEmbedder(hidden_sizes=(4,), code_size=2, score_layer="deep")
    with pytest.raises(ValueError, match="score_layer: expected one of code, hidden; got 'deep'"):
        embedder.fit(rows.reshape(4, 64))
    assert not hasattr(embedder, "history_")  # refused before training


def test_a_vector_score_is_the_gaussian_likelihoods_two_halves_each_standardised():
    """For feature vectors the reconstruction term divides each feature's difference by that
    feature's residual spread on the training rows, and the density term is the code's squared
    Mahalanobis distance from the training codes (numpy by hand here)."""
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture="mlp", hidden_sizes=(8,), code_size=2, loss="mse"), (5,)
    ).eval()
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 5)).astype(np.float32)
    queries = rng.normal(size=(20, 5)).astype(np.float32)
    score = NoveltyScore.fit(model, rows, ScoreSettings(), seed=0)
    assert isinstance(score.density, MahalanobisDistance)
    assert "Mahalanobis" in score.measure and "residual standard deviation" in score.measure

    def parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            residual = (x - model(torch.from_numpy(x)).numpy()).astype(np.float64)
            codes = model.encode(torch.from_numpy(x)).double().numpy()
        return residual, codes

    train_residual, train_codes = parts(rows)
    spread = train_residual.std(0, ddof=1)
    inverse = np.linalg.inv(np.cov(train_codes.T))

    def terms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        residual, codes = parts(x)
        centred = codes - train_codes.mean(0)
        return np.square(residual / spread).mean(1), np.einsum(
            "ij,jk,ik->i", centred, inverse, centred
        )

    (train_recon, train_density), (recon, density) = terms(rows), terms(queries)
    expected = (recon - train_recon.mean()) / train_recon.std(ddof=1) + (
        density - train_density.mean()
    ) / train_density.std(ddof=1)
    with torch.no_grad():
        served = score(torch.from_numpy(queries))[1].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


def test_two_training_rows_give_a_finite_vector_score():
    """Two rows give a rank-one covariance of the codes: its floored eigenvalues keep the
    Mahalanobis distance finite."""
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture="mlp", hidden_sizes=(8,), code_size=3, loss="mse"), (6,)
    )
    rows = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    score = NoveltyScore.fit(model, rows, ScoreSettings(), seed=0)
    queries = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    with torch.no_grad():
        assert torch.isfinite(score(queries)[1]).all()


def test_p_values_and_thresholds_agree_at_every_level():
    calibration = np.sort(np.random.default_rng(0).normal(size=199))
    scores = np.random.default_rng(1).normal(size=5000)
    p = p_values(calibration, scores)
    assert p.min() >= 1 / 200 and p.max() <= 1
    assert p_values(calibration, [calibration[-1] + 1])[0] == pytest.approx(1 / 200)
    assert p_values(calibration, [calibration[0] - 1])[0] == 1.0
    for alpha in ALPHAS:
        np.testing.assert_array_equal(scores > threshold(calibration, alpha=alpha), p <= alpha)
    assert threshold(calibration, alpha=0.001) == np.inf  # 1 / (n + 1) > alpha: none flagged
    assert threshold(calibration, contamination=0.1) == np.quantile(calibration, 0.9)
    with pytest.raises(ValueError, match="exactly one of alpha or contamination"):
        threshold(calibration)


def held_out_fractions(p: np.ndarray) -> dict[float, float]:
    return {alpha: float((p <= alpha).mean()) for alpha in ALPHAS}


def test_shipped_digits_p_values_are_valid_on_held_out_digits():
    """The shipped calibration file holds the graph's scores of the 126 validation digits
    (a graph re-exported without it would fail here). On the 540 test digits (never trained
    on, never calibrated on) at most alpha + 0.01 are flagged at alpha 0.01, 0.05 and 0.1
    (measured 0.013 / 0.039 / 0.067). At alpha 0.01 that is the digits above all 126
    calibration scores, a fraction that varies between draws of the calibration rows by about
    as much as its mean (0.008): a re-export must re-measure it. predict, decision_function
    and offset_ agree."""
    encoder = Encoder.load(SHIPPED, threads=1)
    digits = load_dataset("digits")
    validation = -encoder.score_samples(digits.val.x * np.float32(16))
    stored = np.load(SHIPPED / "1" / CALIBRATION_FILE)
    np.testing.assert_allclose(stored, np.sort(validation), rtol=1e-5, atol=1e-5)
    pixels = digits.test.x * np.float32(16)  # (540, 1, 8, 8) raw 0..16
    p = encoder.p_value(pixels)
    fractions = held_out_fractions(p)
    assert all(fraction <= alpha + 0.01 for alpha, fraction in fractions.items()), fractions
    encoder.alpha = 0.05
    np.testing.assert_array_equal(encoder.predict(pixels) == -1, p <= 0.05)
    decision = encoder.decision_function(pixels)
    np.testing.assert_allclose(decision, encoder.score_samples(pixels) - encoder.offset_)
    assert set(np.unique(encoder.predict(pixels))) <= {-1, 1}
    inverted = encoder.p_value(16 - pixels)
    assert np.median(inverted) < 0.05 < np.median(p)  # inverted digits: novel


def test_table_p_values_are_valid_on_held_out_rows_and_served_equal_in_process(tmp_path):
    """breast-cancer, over ten seeded splits (conformal validity is a statement over the
    draw of the calibration rows): an embedder fitted on 70 % of the rows (30 % of those
    calibrate); of the other 30 %, pooled, the fraction with p <= alpha is at most
    alpha + 0.01. The exported graph and its calibration file give the same p-values through
    `aet.Encoder`."""
    X, y = load_breast_cancer(return_X_y=True)
    pooled = []
    for seed in range(10):
        fit, held = train_test_split(X, train_size=0.7, random_state=seed, stratify=y)
        embedder = AutoencoderEmbedder(
            hidden_sizes=(32,),
            code_size=8,
            epochs=20,
            layer_epochs=5,
            val_fraction=0.3,
            seed=seed,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            embedder.fit(fit)
        pooled.append(embedder.p_value(held))
    for alpha, fraction in held_out_fractions(np.concatenate(pooled)).items():
        assert fraction <= alpha + 0.01, (alpha, fraction)
    embedder.set_params(alpha=None, contamination=0.1)
    flagged = embedder.predict(embedder.validation_rows_) == -1
    assert np.mean(flagged) == pytest.approx(0.1, abs=0.02)
    path = embedder.export(tmp_path, "wbc")
    encoder = Encoder.load(path, threads=1)
    np.testing.assert_allclose(encoder.score_samples(held), embedder.score_samples(held), atol=1e-4)
    np.testing.assert_array_equal(encoder.p_value(held), pooled[-1])


def test_calibration_file_is_checked_and_old_models_say_which_output_is_missing(tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "digits")
    version = tmp_path / "digits" / "1"
    card = read_model_card(version / "model.json")
    assert card.score.calibration_file == CALIBRATION_FILE
    assert card.score.calibration_rows == card.dataset["sizes"]["val"]
    calibration = np.load(version / CALIBRATION_FILE)
    assert len(calibration) == card.score.calibration_rows
    assert (np.diff(calibration) >= 0).all()

    (version / CALIBRATION_FILE).write_bytes(b"not the file")
    with pytest.raises(UserError, match="sha256 mismatch"):
        Encoder.load(version)

    data = json.loads((version / "model.json").read_text())  # as exported before p-values
    del data["score"]["calibration_file"], data["score"]["calibration_sha256"]
    (version / "model.json").write_text(json.dumps(data))
    (version / CALIBRATION_FILE).unlink()
    encoder = Encoder.load(version, threads=1)
    pixels = np.zeros((2, 1, 8, 8), np.float32)
    assert encoder.reconstruction_error(pixels).shape == (2,)  # the score still works
    with pytest.raises(ValueError, match="^p_value: model digits v1 has no calibration scores"):
        encoder.p_value(pixels)
    with pytest.raises(ValueError, match="^offset_: "):
        encoder.predict(pixels)
