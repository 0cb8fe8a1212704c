"""Evaluation of an encoder: held-out reconstruction error and linear probes on frozen codes.

Both sit beside baselines with the same budget: PCA with as many components as the code has
dimensions, and (for probes) the raw pixels. The probe is a logistic regression on standardised
features, trained on a stratified, seeded subset of the labelled training data (`Dataset.fit`)
and scored on the test split. `label_subset` and `linear_probe` are the building blocks that
`aet probe` reuses on served embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aet.config import ConfigError
from aet.training.data import Dataset
from aet.training.models import Autoencoder

BATCH_SIZE = 1024
DEFAULT_LABEL_COUNTS = (100, 1000, None)  # None: all training labels


def label_subset(y: np.ndarray, n_labels: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of `n_labels` examples (all if None or more).

    Raises ConfigError when `n_labels` is smaller than the number of classes.
    """
    if n_labels is None or n_labels >= len(y):
        return np.arange(len(y))
    n_classes = len(np.unique(y))
    if n_labels < n_classes:
        raise ConfigError(
            f"probe labels: expected at least one label per class ({n_classes}); got {n_labels}"
        )
    chosen, _ = train_test_split(
        np.arange(len(y)), train_size=n_labels, stratify=y, random_state=seed
    )
    return np.sort(chosen)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_labels: int | None = None,
    seed: int = 0,
) -> float:
    """Test accuracy of a logistic regression on standardised features (N, D).

    Trains on `label_subset(train_y, n_labels, seed)` of the training features.
    """
    index = label_subset(train_y, n_labels, seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_x[index], train_y[index])
    return float(probe.score(test_x, test_y))


@torch.no_grad()
def encode_array(model: Autoencoder, x: np.ndarray) -> np.ndarray:
    """Codes (N, code_size) of images `x` (N, C, H, W) in [0, 1], in eval mode."""
    model.eval()
    return torch.cat(
        [
            model.encode(torch.from_numpy(x[i : i + BATCH_SIZE]))
            for i in range(0, len(x), BATCH_SIZE)
        ]
    ).numpy()


@torch.no_grad()
def reconstruction_mse(model: Autoencoder, x: np.ndarray) -> float:
    """Mean squared error per pixel, in [0, 1] units, of the model's reconstruction of `x`."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), BATCH_SIZE):
        batch = torch.from_numpy(x[i : i + BATCH_SIZE])
        total += (model.reconstruct(batch) - batch).square().sum().item()
    return total / x.size


def fit_pca(train_x: np.ndarray, n_components: int, seed: int = 0) -> PCA:
    """PCA with `n_components` fitted on flattened images (N, C, H, W)."""
    return PCA(n_components=n_components, random_state=seed).fit(train_x.reshape(len(train_x), -1))


def pca_reconstruction_mse(pca: PCA, x: np.ndarray) -> float:
    """Mean squared error per pixel of the PCA projection of images `x`."""
    flat = x.reshape(len(x), -1)
    return float(np.mean((pca.inverse_transform(pca.transform(flat)) - flat) ** 2))


def evaluate_autoencoder(
    model: Autoencoder,
    dataset: Dataset,
    label_counts: tuple[int | None, ...] = DEFAULT_LABEL_COUNTS,
    seed: int = 0,
) -> dict:
    """Test reconstruction MSE beside PCA, and probe accuracies beside pixels and PCA.

    Returns a JSON-serialisable dict; probes are skipped when the data set has no labels.
    """
    pca = fit_pca(dataset.train.x, model.code_size, seed)
    model_mse = reconstruction_mse(model, dataset.test.x)
    pca_mse = pca_reconstruction_mse(pca, dataset.test.x)
    result: dict = {
        "code_size": model.code_size,
        "test_examples": len(dataset.test),
        "reconstruction_mse": {
            "model": model_mse,
            "pca": pca_mse,
            "model_over_pca": model_mse / pca_mse,
        },
    }
    fit, test = dataset.fit, dataset.test
    if fit.y is None or test.y is None:
        return result
    features = {
        "model": (encode_array(model, fit.x), encode_array(model, test.x)),
        "pixels": (fit.x.reshape(len(fit), -1), test.x.reshape(len(test), -1)),
        "pca": (
            pca.transform(fit.x.reshape(len(fit), -1)),
            pca.transform(test.x.reshape(len(test), -1)),
        ),
    }
    counts = [len(fit) if n is None else min(n, len(fit)) for n in label_counts]
    result["probe"] = {
        "labels": counts,
        **{
            name: [linear_probe(train, fit.y, held_out, test.y, n, seed) for n in counts]
            for name, (train, held_out) in features.items()
        },
    }
    return result


def format_evaluation(result: dict) -> str:
    """A short human-readable table of `evaluate_autoencoder`'s result."""
    mse = result["reconstruction_mse"]
    lines = [
        f"test reconstruction MSE: model {mse['model']:.5f}  PCA-{result['code_size']} "
        f"{mse['pca']:.5f}  (ratio {mse['model_over_pca']:.2f})"
    ]
    if "probe" in result:
        probe = result["probe"]
        lines.append(
            "linear probe accuracy  " + "  ".join(f"{n:>7} labels" for n in probe["labels"])
        )
        for name in ("model", "pixels", "pca"):
            label = f"PCA-{result['code_size']}" if name == "pca" else name
            lines.append(f"  {label:<21}" + "  ".join(f"{a:>14.3f}" for a in probe[name]))
    return "\n".join(lines)
