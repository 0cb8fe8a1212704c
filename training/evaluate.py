"""Evaluation of an encoder: held-out reconstruction error and fair probes on frozen codes.

Both sit beside baselines with the same budget: PCA with as many components as the code has
dimensions, and (for probes) the raw pixels. The probes (`training.probes`: logistic regression
and k-NN, each tuned by cross-validation on its labelled subset) learn from stratified, seeded
subsets of the labelled training data (`Dataset.fit`) and are scored on the test split.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA

from aet.training.data import Dataset
from aet.training.mapped import Images
from aet.training.models import Autoencoder
from aet.training.probes import PROBE_FUNCTIONS, FeatureSet, format_settings, probe_features

BATCH_SIZE = 1024
DEFAULT_LABEL_COUNTS = (100, 1000, None)  # None: all training labels


@torch.no_grad()
def encode_array(model: Autoencoder, x: Images) -> np.ndarray:
    """Codes (N, code_size) of images `x` (N, C, H, W) in [0, 1], in eval mode."""
    model.eval()
    return torch.cat(
        [
            model.encode(torch.from_numpy(x[i : i + BATCH_SIZE]))
            for i in range(0, len(x), BATCH_SIZE)
        ]
    ).numpy()


@torch.no_grad()
def reconstruction_mse(model: Autoencoder, x: Images) -> float:
    """Mean squared error per pixel, in [0, 1] units, of the model's reconstruction of `x`."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), BATCH_SIZE):
        batch = torch.from_numpy(x[i : i + BATCH_SIZE])
        total += (model.reconstruct(batch) - batch).square().sum().item()
    return total / x.size


def fit_pca(train_x: Images, n_components: int, seed: int = 0) -> PCA:
    """PCA with `n_components` (at most the pixels and images there are) on flattened images
    (N, C, H, W); `n_components_` says how many it has."""
    flat = train_x.reshape(len(train_x), -1)
    n_components = min(n_components, *flat.shape)  # an overcomplete code outgrows PCA
    return PCA(n_components=n_components, random_state=seed).fit(flat)


def pca_reconstruction_mse(pca: PCA, x: Images) -> float:
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

    Returns a JSON-serialisable dict; probes are skipped when the data set has no labels or
    `label_counts` is empty.
    `probe` holds `labels`, then `accuracy` and the chosen `settings` of each feature set
    (`model`, `pixels`, `pca`) and probe (`logreg`, `knn`) at each label budget.
    """
    pca = fit_pca(dataset.train.x, model.code_size, seed)
    model_mse = reconstruction_mse(model, dataset.test.x)
    pca_mse = pca_reconstruction_mse(pca, dataset.test.x)
    result: dict = {
        "code_size": model.code_size,
        "pca_components": int(pca.n_components_),
        "test_examples": len(dataset.test),
        "reconstruction_mse": {
            "model": model_mse,
            "pca": pca_mse,
            # PCA with as many components as pixels reconstructs exactly: no ratio then
            "model_over_pca": model_mse / pca_mse if pca_mse > 1e-12 else None,
        },
    }
    fit, test = dataset.fit, dataset.test
    if fit.y is None or test.y is None or not label_counts:
        return result
    features = [
        FeatureSet("model", encode_array(model, fit.x), encode_array(model, test.x)),
        FeatureSet("pixels", fit.x.reshape(len(fit), -1), test.x.reshape(len(test), -1)),
        FeatureSet(
            "pca",
            pca.transform(fit.x.reshape(len(fit), -1)),
            pca.transform(test.x.reshape(len(test), -1)),
        ),
    ]
    counts = [len(fit) if n is None else min(n, len(fit)) for n in label_counts]
    result["probe"] = probe_features(features, fit.y, test.y, counts, seed)
    return result


def format_evaluation(result: dict) -> str:
    """A short human-readable table of `evaluate_autoencoder`'s result."""
    mse = result["reconstruction_mse"]
    ratio = mse["model_over_pca"]
    lines = [
        f"test reconstruction MSE: model {mse['model']:.5f}  PCA-{result['pca_components']} "
        f"{mse['pca']:.5f}  (ratio {'n/a' if ratio is None else f'{ratio:.2f}'})"
    ]
    if "probe" in result:
        probe = result["probe"]
        for kind in PROBE_FUNCTIONS:
            title = {"logreg": "logistic probe", "knn": "k-NN probe"}[kind]
            lines.append(
                f"{title} accuracy  " + "  ".join(f"{n:>7} labels" for n in probe["labels"])
            )
            for name, by_probe in probe["accuracy"].items():
                label = f"PCA-{result['pca_components']}" if name == "pca" else name
                chosen = "; ".join(format_settings(s) for s in probe["settings"][name][kind])
                lines.append(
                    f"  {label:<19}"
                    + "  ".join(f"{a:>14.3f}" for a in by_probe[kind])
                    + f"   ({chosen})"
                )
    return "\n".join(lines)
