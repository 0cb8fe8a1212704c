"""The novelty score the exported graph computes: reconstruction and code density, one float a row.

Two terms, each measured on the model's own training rows and put on one scale there:

- `reconstruction`: the reconstruction error in the model's likelihood terms, with a minimum of
  zero for a perfect reconstruction. For a Bernoulli decoder (`bce`) that is the KL form, the
  binary cross-entropy minus the input's own entropy (the entropy is a property of the image,
  largest for grey edge pixels, and on its own ranks novel digits *below* normal ones); for a
  Gaussian decoder (`mse`) the squared error, whose minimum is already zero.
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

from aet.training.models import Autoencoder

DEFAULT_NEIGHBOURS = 5
MAX_REFERENCE_CODES = 2000
_EPS = 1e-7


@dataclass(frozen=True)
class ScoreSettings:
    """How `NoveltyScore` combines its terms; recorded in model.json."""

    density: bool = True
    neighbours: int = DEFAULT_NEIGHBOURS


def reconstruction_term(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(B,) mean over input values of the KL form of the Bernoulli likelihood (`bce`: output as
    logits, target in [0, 1]) or of the squared error (`mse`); zero for a perfect reconstruction."""
    if kind == "bce":
        # binary cross-entropy with logits in its stable form, minus the target's own entropy
        cross_entropy = (
            output.clamp(min=0) - output * target + torch.log1p(torch.exp(-output.abs()))
        )
        t = target.clamp(_EPS, 1 - _EPS)
        entropy = -(target * torch.log(t) + (1 - target) * torch.log(1 - t))
        per_feature = cross_entropy - entropy
    else:
        per_feature = (output - target).square()
    return per_feature.flatten(1).mean(1)


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
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.neighbours = int(neighbours)
        self.density = reference is not None
        self.register_buffer("reference", reference if reference is not None else torch.zeros(1, 1))
        self.register_buffer("scales", scales)  # (2, 2): [term][mean, std]

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
        x = torch.as_tensor(np.asarray(train, dtype=np.float32))
        if not settings.density:
            return cls(autoencoder, None, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 1)
        if len(x) < 2:
            raise ValueError(f"novelty score: need at least 2 training rows; got {len(x)}")
        with torch.no_grad():
            codes = torch.cat([autoencoder.encode(x[i : i + 1024]) for i in range(0, len(x), 1024)])
            recon = torch.cat(
                [
                    reconstruction_term(
                        autoencoder(x[i : i + 1024]),
                        x[i : i + 1024],
                        autoencoder.config.resolved_loss,
                    )
                    for i in range(0, len(x), 1024)
                ]
            )
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
        return cls(autoencoder, reference.clone(), scales, k)

    reference: torch.Tensor
    scales: torch.Tensor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.autoencoder.encode(x)
        recon = reconstruction_term(
            self.autoencoder.decode(code), x, self.autoencoder.config.resolved_loss
        )
        if not self.density:
            return code, recon
        density = knn_distance(code, self.reference, self.neighbours)
        score = (recon - self.scales[0, 0]) / self.scales[0, 1] + (
            density - self.scales[1, 0]
        ) / self.scales[1, 1]
        return code, score
