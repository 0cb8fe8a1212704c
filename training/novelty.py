"""The novelty score the exported graph computes: reconstruction and code density, one float a row.

Two terms, each measured on the model's own training rows and put on one scale there:

- `reconstruction`: the mean squared difference between the input and its reconstruction (the
  decoder's mean: the sigmoid of a Bernoulli decoder's logits), zero for a perfect
  reconstruction. For images the difference is first smoothed with a Gaussian of `sigma`
  pixels (`stroke_sigma`: 1 pixel at 28 pixels a side, in proportion otherwise), so a stroke
  drawn a pixel to the side, which every reconstruction blurs, costs little while a stroke
  missing or added costs all its pixels. On one-class MNIST that ranks novel digits better
  than the unsmoothed error and than the Bernoulli likelihood's own KL form (docs/novelty.md).
  For vectors (standardised features, a Gaussian output model) each feature's difference is
  divided by that feature's residual standard deviation on the training rows: the Gaussian
  likelihood with one variance per feature, so a feature the model reconstructs closely
  counts its misses for more than one it barely models.
- `density`: how unusual the row's code is among the codes of the training rows (or, with
  `layer="hidden"`, its activations in the encoder's first hidden layer among theirs: on 8x8
  digits with a small code that layer keeps what sets a novel digit apart, docs/novelty.md).
  For images, the local outlier factor (Breunig et al. 2000, scikit-learn's
  `LocalOutlierFactor`, `OutlierFactor`): the graph holds the training rows' features (at most
  `MAX_REFERENCE_ROWS`, a seeded sample beyond that) with each one's k-distance and local
  reachability density; it adapts to clusters of different spreads (the variants of a digit).
  For vectors, the squared Mahalanobis distance from the training features' mean under their
  covariance (`MahalanobisDistance`): a Gaussian density of the code, the likelihood's other
  half, which a few hundred rows estimate far more steadily than a local outlier factor
  (docs/novelty.md).

The score is the sum of the two terms, each standardised by its mean and standard deviation on
the training rows (a row scoring like an average training row scores about 0; higher is more
unusual; a training row's local outlier factor leaves its own code out). With `density=False`
the score is the reconstruction term as it is (unscaled, and unweighted for vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from aet.config import ConfigError
from aet.training.models import FULLY_CONNECTED, Autoencoder, MLPAutoencoder

DEFAULT_NEIGHBOURS = 5
MAX_REFERENCE_ROWS = 2000
STROKE_SIDE = 28  # images of this side are smoothed with sigma 1 pixel
_EPS = 1e-7
RESIDUAL_FLOOR = 1e-3  # vectors: a feature's residual spread, in standardised units
_LOF_EPS = 1e-10  # scikit-learn's: duplicate codes give a large, finite density
# What the density term measures, and how model.json names it: (one row's, the training rows').
DENSITY_LAYERS = {
    "code": ("code", "training codes"),
    "hidden": ("encoder's first hidden layer", "training rows' first hidden layers"),
}


@dataclass(frozen=True)
class ScoreSettings:
    """How `NoveltyScore` combines its terms; recorded in model.json."""

    density: bool = True
    neighbours: int = DEFAULT_NEIGHBOURS  # images: the local outlier factor's
    smooth: bool = True  # images: smooth the difference (`stroke_sigma`) before squaring
    layer: str = "code"  # the density term's features: a `DENSITY_LAYERS` key


def is_image(shape: tuple[int, ...]) -> bool:
    """Whether rows of `shape` are images (C, H, W) rather than feature vectors (D,)."""
    return len(shape) == 3


def stroke_sigma(image_shape: tuple[int, ...]) -> float:
    """The smoothing's sigma in pixels for images of `image_shape` (C, H, W); 0 for vectors."""
    if not is_image(image_shape):
        return 0.0
    return max(image_shape[1:]) / STROKE_SIDE


def smoothing_kernel(sigma: float, channels: int) -> torch.Tensor:
    """(channels, 1, k, k) normalised Gaussian kernel, k = 2 * round(3 sigma) + 1, one per
    channel (a depthwise convolution)."""
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-offsets.square() / (2 * sigma * sigma))
    kernel = (g[:, None] * g[None, :]) / g.sum().square()
    return kernel.float().expand(channels, 1, -1, -1).clone()


def reconstruction_term(
    output: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    image_shape: tuple[int, ...],
    kernel: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) mean squared difference between `target` and the decoder's mean for `output` (its
    sigmoid for `bce` logits, itself for `mse`), smoothed by the depthwise `kernel`
    (`smoothing_kernel`) over images of `image_shape` first when one is given, or divided by a
    per-feature `scale` (D,) when one is given."""
    difference = reconstruction_difference(output, target, kind)
    if kernel is not None:
        images = difference.view(-1, *image_shape)
        difference = F.conv2d(images, kernel, padding=kernel.shape[-1] // 2, groups=len(kernel))
    if scale is not None:
        difference = difference / scale
    return difference.square().flatten(1).mean(1)


def reconstruction_difference(
    output: torch.Tensor, target: torch.Tensor, kind: str
) -> torch.Tensor:
    """(B, D) `target` minus the decoder's mean for `output`, flattened."""
    mean = torch.sigmoid(output) if kind == "bce" else output
    return target.flatten(1) - mean.flatten(1)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) squared Euclidean distances between the rows of `a` and `b`, in float64: the
    expanded |a|^2 - 2ab + |b|^2 loses the small distances to cancellation in float32, and
    PyTorch and onnxruntime would then disagree."""
    a, b = a.double(), b.double()
    return a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1).unsqueeze(0)


def nearest(squared: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` smallest of each row of `squared` distances: (distances (A, k), indices (A, k))."""
    values, index = torch.topk(squared, k, dim=1, largest=False)
    return values.clamp(min=0).sqrt(), index


def local_outlier_factor(
    distances: torch.Tensor,
    index: torch.Tensor,
    k_distance: torch.Tensor,
    density: torch.Tensor,
) -> torch.Tensor:
    """(A,) local outlier factors of rows whose nearest reference rows are at `distances`
    (A, k), rows `index` (A, k) of the references, given each reference's `k_distance` and
    local reachability `density` (R,) (`reference_neighbourhoods`)."""
    reach = torch.maximum(distances, k_distance[index])
    return density[index].mean(1) * (reach.mean(1) + _LOF_EPS)


def reference_neighbourhoods(reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reference row's k-distance and local reachability density among the other
    reference rows, (R,) each in float64."""
    squared = squared_distances(reference, reference)
    squared.fill_diagonal_(torch.inf)  # a row is not its own neighbour
    distances, index = nearest(squared, k)
    k_distance = distances[:, -1]
    reach = torch.maximum(distances, k_distance[index])
    return k_distance, 1.0 / (reach.mean(1) + _LOF_EPS)


def check_layer(architecture: str, layer: str) -> None:
    """A ConfigError unless the density term can read `layer` of an `architecture` encoder."""
    if layer not in DENSITY_LAYERS:
        raise ConfigError(
            f"score_layer: expected one of {', '.join(DENSITY_LAYERS)}; got {layer!r}"
        )
    if layer == "hidden" and architecture not in FULLY_CONNECTED:
        raise ConfigError(
            "score_layer: 'hidden' reads the first hidden layer of a fully connected encoder "
            f"({', '.join(FULLY_CONNECTED)}); got architecture {architecture!r}"
        )


def density_features(
    autoencoder: Autoencoder, layer: str, x: torch.Tensor, code: torch.Tensor
) -> torch.Tensor:
    """(B, C) what the density term measures of rows `x` whose codes are `code`: the code
    itself, or the encoder's first hidden layer (`check_layer`)."""
    if layer == "code":
        return code
    return cast(MLPAutoencoder, autoencoder).encode_layer(0, x.flatten(1))


class OutlierFactor(torch.nn.Module):
    """Features (B, C) -> (B,) their local outlier factors among reference rows (R, C), kept
    with each one's k-distance and local reachability density; `layer` names the features (a
    `DENSITY_LAYERS` key)."""

    def __init__(self, reference: torch.Tensor, neighbours: int, layer: str = "code"):
        super().__init__()
        self.neighbours = int(neighbours)
        self.layer = layer
        k_distance, local_density = reference_neighbourhoods(reference, self.neighbours)
        self.register_buffer("reference", reference)
        self.register_buffer("k_distance", k_distance)
        self.register_buffer("local_density", local_density)

    reference: torch.Tensor
    k_distance: torch.Tensor
    local_density: torch.Tensor

    @property
    def measure(self) -> str:
        one, training = DENSITY_LAYERS[self.layer]
        return (
            f"the local outlier factor of the {one} among the {training} "
            f"({self.neighbours} neighbours; kept in the graph)"
        )

    def outlier_factor(self, squared: torch.Tensor) -> torch.Tensor:
        """(B,) local outlier factors of rows at `squared` distances (B, R) to the references."""
        distances, index = nearest(squared, self.neighbours)
        return local_outlier_factor(distances, index, self.k_distance, self.local_density).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.outlier_factor(squared_distances(features, self.reference))

    @classmethod
    def of_training(
        cls, features: torch.Tensor, neighbours: int, seed: int, layer: str = "code"
    ) -> tuple[OutlierFactor, torch.Tensor]:
        """The factor over the training rows' `features` (N, C) (at most `MAX_REFERENCE_ROWS`
        of them, a sample seeded by `seed` beyond that), and the (N,) factors of those rows
        themselves, each leaving its own out where it is a reference."""
        keep = torch.arange(len(features))
        if len(features) > MAX_REFERENCE_ROWS:
            chosen = np.random.default_rng(seed).choice(len(features), MAX_REFERENCE_ROWS, False)
            keep = torch.from_numpy(np.sort(chosen))
        factor = cls(features[keep].clone(), max(1, min(neighbours, len(keep) - 1)), layer)
        places = torch.full((len(features),), -1)  # each row's place among the references
        places[keep] = torch.arange(len(keep))
        return factor, factor.leaving_out(features, places)

    def leaving_out(self, features: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """(N,) the factors of `features`, each leaving out the reference at its place in
        `places` (-1: none)."""
        factors = []
        for rows, own in zip(features.split(1024), places.split(1024), strict=True):
            squared = squared_distances(rows, self.reference)
            member = torch.nonzero(own >= 0).squeeze(1)
            squared[member, own[member]] = torch.inf
            factors.append(self.outlier_factor(squared))
        return torch.cat(factors)


class MahalanobisDistance(torch.nn.Module):
    """Features (B, C) -> (B,) their squared Mahalanobis distances from the mean of the
    training rows' under their covariance (its eigenvalues floored at `EIGEN_FLOOR` of their
    mean, so two rows or a dimension the rows never use still give a finite distance); `layer`
    names the features (a `DENSITY_LAYERS` key)."""

    EIGEN_FLOOR = 1e-6

    def __init__(self, features: torch.Tensor, layer: str = "code"):
        super().__init__()
        self.layer = layer
        features = features.double()
        mean = features.mean(0)
        centred = features - mean
        covariance = centred.T @ centred / max(len(features) - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        floor = self.EIGEN_FLOOR * max(float(eigenvalues.clamp(min=0).mean()), _EPS)
        whitening = eigenvectors / eigenvalues.clamp(min=floor).sqrt()
        self.register_buffer("mean", mean.float())
        self.register_buffer("whitening", whitening.float())  # (C, C): whitened = centred @ it

    mean: torch.Tensor
    whitening: torch.Tensor

    @property
    def measure(self) -> str:
        one, training = DENSITY_LAYERS[self.layer]
        return (
            f"the squared Mahalanobis distance of the {one} from the {training}' mean under "
            "their covariance"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) @ self.whitening).square().sum(1)


class NoveltyScore(torch.nn.Module):
    """Preprocessed rows -> (codes (B, code_size), novelty score (B,)), see the module doc."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        density: OutlierFactor | MahalanobisDistance | None,
        scales: torch.Tensor,
        smooth: bool = True,
        residual_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.density = density
        self.sigma = stroke_sigma(autoencoder.image_shape) if smooth else 0.0
        self.register_buffer("scales", scales)  # (2, 2): [term][mean, std]
        self.register_buffer("residual_scale", residual_scale)  # (D,) vectors, or None
        self.register_buffer(
            "kernel",
            smoothing_kernel(self.sigma, autoencoder.image_shape[0]) if self.sigma else None,
        )

    @classmethod
    def fit(
        cls,
        autoencoder: Autoencoder,
        train: np.ndarray | torch.Tensor,
        settings: ScoreSettings = ScoreSettings(),
        seed: int = 0,
    ) -> NoveltyScore:
        """The score for `autoencoder` (eval mode), its statistics from the preprocessed
        training rows `train` (N, ...)."""
        autoencoder = autoencoder.eval()
        identity = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        if not settings.density:
            return cls(autoencoder, None, identity, settings.smooth)
        x = torch.as_tensor(np.asarray(train, dtype=np.float32))
        if len(x) < 2:
            raise ValueError(f"novelty score: need at least 2 training rows; got {len(x)}")
        check_layer(autoencoder.config.architecture, settings.layer)
        kind = autoencoder.config.resolved_loss
        with torch.no_grad():
            codes = torch.cat([autoencoder.encode(batch) for batch in x.split(1024)])
            features = torch.cat(
                [
                    density_features(autoencoder, settings.layer, batch, code)
                    for batch, code in zip(x.split(1024), codes.split(1024), strict=True)
                ]
            )
            residual_scale = None
            if not is_image(autoencoder.image_shape):  # vectors: a residual spread per feature
                differences = torch.cat(
                    [
                        reconstruction_difference(autoencoder.decode(code), batch, kind)
                        for code, batch in zip(codes.split(1024), x.split(1024), strict=True)
                    ]
                )
                residual_scale = differences.std(0).clamp(min=RESIDUAL_FLOOR)
                density: OutlierFactor | MahalanobisDistance = MahalanobisDistance(
                    features, settings.layer
                )
                training_density = density(features)
            else:
                density, training_density = OutlierFactor.of_training(
                    features, settings.neighbours, seed, settings.layer
                )
            scorer = cls(autoencoder, density, identity.clone(), settings.smooth, residual_scale)
            recon = torch.cat(
                [
                    scorer.reconstruction(batch, code)
                    for batch, code in zip(x.split(1024), codes.split(1024), strict=True)
                ]
            )
        scorer.scales.copy_(
            torch.tensor(
                [
                    [float(recon.mean()), max(float(recon.std()), _EPS)],
                    [float(training_density.mean()), max(float(training_density.std()), _EPS)],
                ]
            )
        )
        return scorer

    scales: torch.Tensor
    residual_scale: torch.Tensor | None
    kernel: torch.Tensor | None

    @property
    def measure(self) -> str:
        """What the score is, in words (model.json's `score.measure`)."""
        if self.sigma:
            recon = (
                "mean squared difference per pixel between the preprocessed input and its "
                f"reconstruction, after a Gaussian smoothing of the difference (sigma "
                f"{self.sigma:.3g} pixels)"
            )
        elif self.residual_scale is not None:
            recon = (
                "mean squared error per feature in standardised units, each feature's divided "
                "by its residual standard deviation on the training rows"
            )
        else:
            recon = "mean squared error per feature, in standardised units"
        if self.density is None:
            return recon
        return (
            f"{recon}, standardised on the training rows, plus {self.density.measure}, "
            "standardised likewise"
        )

    def reconstruction(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """(B,) the reconstruction term of rows `x` whose codes are `code`."""
        return reconstruction_term(
            self.autoencoder.decode(code),
            x,
            self.autoencoder.config.resolved_loss,
            self.autoencoder.image_shape,
            self.kernel,
            self.residual_scale,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.autoencoder.encode(x)
        recon = self.reconstruction(x, code)
        if self.density is None:
            return code, recon
        features = density_features(self.autoencoder, self.density.layer, x, code)
        score = (recon - self.scales[0, 0]) / self.scales[0, 1] + (
            self.density(features) - self.scales[1, 0]
        ) / self.scales[1, 1]
        return code, score
