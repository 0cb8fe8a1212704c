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
- `density`: the mean Euclidean distance of the row's code to its `neighbours` nearest codes of
  the training rows, which the graph holds as a constant (at most `MAX_REFERENCE_CODES` rows,
  a seeded sample beyond that). On the training rows themselves a row's own code is left out.

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


def knn_distance(codes: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) mean Euclidean distance of each code to its `k` nearest rows of `reference`.

    In float64: the expanded square |a|^2 - 2ab + |b|^2 loses the small distances to
    cancellation in float32, and PyTorch and onnxruntime would then disagree."""
    a, b = codes.double(), reference.double()
    squared = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1).unsqueeze(0)
    nearest = torch.topk(squared, k, dim=1, largest=False).values
    return nearest.clamp(min=0).sqrt().mean(1).float()


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
        k = max(1, min(settings.neighbours, len(codes) - 1))
        reference = codes
        if len(codes) > MAX_REFERENCE_CODES:
            keep = np.random.default_rng(seed).choice(len(codes), MAX_REFERENCE_CODES, False)
            reference = codes[torch.from_numpy(np.sort(keep))]
        with torch.no_grad():  # leave-one-out on the training rows: k + 1 nearest, self dropped
            b = reference.double()
            squared = torch.cat(
                [
                    (c.square().sum(1, keepdim=True) - 2 * c @ b.T + b.square().sum(1).unsqueeze(0))
                    for c in codes.double().split(1024)
                ]
            )
            nearest = torch.topk(squared, min(k + 1, len(reference)), dim=1, largest=False).values
            density = nearest[:, 1:].clamp(min=0).sqrt().mean(1)
        scales = torch.tensor(
            [
                [float(recon.mean()), max(float(recon.std()), _EPS)],
                [float(density.mean()), max(float(density.std()), _EPS)],
            ]
        )
        return cls(autoencoder, reference.clone(), scales, k, settings.smooth)

    reference: torch.Tensor
    scales: torch.Tensor
    kernel: torch.Tensor | None

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
        density = knn_distance(code, self.reference, self.neighbours)
        score = (recon - self.scales[0, 0]) / self.scales[0, 1] + (
            density - self.scales[1, 0]
        ) / self.scales[1, 1]
        return code, score
