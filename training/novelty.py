"""The novelty score the exported graph computes: reconstruction and code density, one float a row.

Two terms, each measured on the model's own training rows and put on one scale there:

- `reconstruction`: the mean squared difference between the input and its reconstruction (the
  decoder's mean: the sigmoid of a Bernoulli decoder's logits), zero for a perfect
  reconstruction. For images the difference is first smoothed with a Gaussian of `sigma`
  pixels (`stroke_sigma`: 1 pixel at 28 pixels a side, in proportion otherwise), so a stroke
  drawn a pixel to the side, which every reconstruction blurs, costs little while a stroke
  missing or added costs all its pixels. On one-class MNIST that ranks novel digits better
  than the unsmoothed error and than the Bernoulli likelihood's own KL form (docs/novelty.md).
  For vectors it is the squared error in standardised units.
- `density`: the local outlier factor (Breunig et al. 2000, scikit-learn's
  `LocalOutlierFactor`) of the row's code among the codes of the training rows, which the
  graph holds as constants with each one's k-distance and local reachability density (at most
  `MAX_REFERENCE_CODES` rows, a seeded sample beyond that): the mean density of the code's
  `neighbours` nearest training codes over its own, about 1 inside a cluster of training codes
  and larger away from one. Unlike a plain distance it adapts to clusters of different
  spreads. On the training rows themselves a row's own code is left out.

The score is the sum of the two terms, each standardised by its mean and standard deviation on
the training rows (a row scoring like an average training row scores about 0; higher is more
unusual). With `density=False` the score is the reconstruction term as it is (no scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aet.training.models import Autoencoder

DEFAULT_NEIGHBOURS = 5
MAX_REFERENCE_CODES = 2000
STROKE_SIDE = 28  # images of this side are smoothed with sigma 1 pixel
_EPS = 1e-7
_LOF_EPS = 1e-10  # scikit-learn's: duplicate codes give a large, finite density


@dataclass(frozen=True)
class ScoreSettings:
    """How `NoveltyScore` combines its terms; recorded in model.json."""

    density: bool = True
    neighbours: int = DEFAULT_NEIGHBOURS
    smooth: bool = True  # images: smooth the difference (`stroke_sigma`) before squaring


def stroke_sigma(image_shape: tuple[int, ...]) -> float:
    """The smoothing's sigma in pixels for images of `image_shape` (C, H, W); 0 for vectors."""
    if len(image_shape) != 3:
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
) -> torch.Tensor:
    """(B,) mean squared difference between `target` and the decoder's mean for `output` (its
    sigmoid for `bce` logits, itself for `mse`), smoothed by the depthwise `kernel`
    (`smoothing_kernel`) over images of `image_shape` first when one is given."""
    mean = torch.sigmoid(output) if kind == "bce" else output
    difference = target.flatten(1) - mean.flatten(1)
    if kernel is not None:
        images = difference.view(-1, *image_shape)
        difference = F.conv2d(images, kernel, padding=kernel.shape[-1] // 2, groups=len(kernel))
    return difference.square().flatten(1).mean(1)


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


class NoveltyScore(torch.nn.Module):
    """Preprocessed rows -> (codes (B, code_size), novelty score (B,)), see the module doc."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        reference: torch.Tensor | None,
        scales: torch.Tensor,
        neighbours: int,
        smooth: bool = True,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.neighbours = int(neighbours)
        self.density = reference is not None
        self.sigma = stroke_sigma(autoencoder.image_shape) if smooth else 0.0
        self.register_buffer("reference", reference if reference is not None else torch.zeros(1, 1))
        k_distance, local_density = (
            reference_neighbourhoods(reference, self.neighbours)
            if reference is not None
            else (torch.zeros(1), torch.zeros(1))
        )
        self.register_buffer("k_distance", k_distance)
        self.register_buffer("local_density", local_density)
        self.register_buffer("scales", scales)  # (2, 2): [term][mean, std]
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
        unscaled = cls(autoencoder, None, identity, 1, settings.smooth)
        if not settings.density:
            return unscaled
        x = torch.as_tensor(np.asarray(train, dtype=np.float32))
        if len(x) < 2:
            raise ValueError(f"novelty score: need at least 2 training rows; got {len(x)}")
        with torch.no_grad():
            parts = [unscaled(batch) for batch in x.split(1024)]
        codes = torch.cat([code for code, _ in parts])
        recon = torch.cat([term for _, term in parts])
        keep = np.arange(len(codes))
        if len(codes) > MAX_REFERENCE_CODES:
            keep = np.sort(
                np.random.default_rng(seed).choice(len(codes), MAX_REFERENCE_CODES, False)
            )
        reference = codes[torch.from_numpy(keep)].clone()
        k = max(1, min(settings.neighbours, len(reference) - 1))
        scorer = cls(autoencoder, reference, identity.clone(), k, settings.smooth)
        own = torch.full((len(codes),), -1)  # each training row's place among the references
        own[torch.from_numpy(keep)] = torch.arange(len(keep))
        with torch.no_grad():  # leave-one-out on the training rows that are references
            factors = []
            for rows, places in zip(codes.split(1024), own.split(1024), strict=True):
                squared = squared_distances(rows, reference)
                member = torch.nonzero(places >= 0).squeeze(1)
                squared[member, places[member]] = torch.inf
                factors.append(scorer.outlier_factor(squared))
            density = torch.cat(factors)
        scorer.scales.copy_(
            torch.tensor(
                [
                    [float(recon.mean()), max(float(recon.std()), _EPS)],
                    [float(density.mean()), max(float(density.std()), _EPS)],
                ]
            )
        )
        return scorer

    reference: torch.Tensor
    k_distance: torch.Tensor
    local_density: torch.Tensor
    scales: torch.Tensor
    kernel: torch.Tensor | None

    def outlier_factor(self, squared: torch.Tensor) -> torch.Tensor:
        """(B,) local outlier factors of codes at `squared` distances (B, R) to the references."""
        distances, index = nearest(squared, self.neighbours)
        return local_outlier_factor(distances, index, self.k_distance, self.local_density).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.autoencoder.encode(x)
        recon = reconstruction_term(
            self.autoencoder.decode(code),
            x,
            self.autoencoder.config.resolved_loss,
            self.autoencoder.image_shape,
            self.kernel,
        )
        if not self.density:
            return code, recon
        density = self.outlier_factor(squared_distances(code, self.reference))
        score = (recon - self.scales[0, 0]) / self.scales[0, 1] + (
            density - self.scales[1, 0]
        ) / self.scales[1, 1]
        return code, score
