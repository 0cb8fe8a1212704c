"""Image augmentation for pretraining: random translation, rotation and scale of whole batches.

Small data sets overfit an autoencoder; showing each image shifted, turned and resized a little
teaches codes that ignore such nudges (scikit-learn's RBM example augments digits by one-pixel
shifts for this reason). The transform is `torchvision.transforms.v2.functional.affine` with
bilinear interpolation, drawn from a seeded `torch.Generator` that the checkpoint saves, so a
resumed run draws the same transforms. One draw covers one batch (one affine call per training
step keeps the step cheap); over the epochs every image meets many different transforms.

Training only: validation, evaluation and export see the images as they are. By default the
augmented image is the reconstruction target, and noise (training.corruption) then corrupts the
input; with `input_only` the augmentation is part of the corruption instead: the model sees the
nudged, noisy image and must reconstruct the image as it is, which asks the code to undo the
nudge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aet.config import ConfigError


@dataclass(frozen=True)
class AugmentationConfig:
    """How far a batch may move (`aet pretrain`'s augment flags): all zeros is no augmentation."""

    augment_translate: float = field(
        default=0.0,
        metadata={"help": "largest random shift, as a fraction of the image side (0: off)"},
    )
    augment_rotate: float = field(
        default=0.0, metadata={"help": "largest random rotation in degrees (0: off)"}
    )
    augment_scale: float = field(
        default=0.0,
        metadata={
            "help": "largest random relative change of size, e.g. 0.1 for [0.9, 1.1] (0: off)"
        },
    )
    augment_input_only: bool = field(
        default=False,
        metadata={
            "help": "augment the input only and reconstruct the image as it is, so the code "
            "must undo the nudge (default: the augmented image is also the target)"
        },
    )

    def __post_init__(self) -> None:
        for name, high in (
            ("augment_translate", 0.5),
            ("augment_rotate", 180.0),
            ("augment_scale", 0.5),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= high):
                raise ConfigError(f"{name}: expected a number in [0, {high:g}]; got {value}")

    @property
    def enabled(self) -> bool:
        return any((self.augment_translate, self.augment_rotate, self.augment_scale))


@dataclass(eq=False)
class Augmentation:
    """`augment(batch)`: a randomly translated, rotated and scaled copy of `batch` (B, C, H, W)."""

    config: AugmentationConfig
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def _uniform(self, bound: float) -> float:
        """One draw from U(-bound, bound); always drawn, so the stream does not depend on zeros."""
        return (2 * torch.rand((), generator=self.generator).item() - 1) * bound

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # Imported here, by runs that augment: torchvision's import takes seconds (it loads its
        # models and ops), which every `aet` command would otherwise pay at start-up.
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import affine

        height, width = batch.shape[-2:]
        dx = self._uniform(self.config.augment_translate * width)
        dy = self._uniform(self.config.augment_translate * height)
        angle = self._uniform(self.config.augment_rotate)
        scale = 1.0 + self._uniform(self.config.augment_scale)
        return affine(
            batch,
            angle=angle,
            translate=[dx, dy],
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )


def build_augmentation(config: AugmentationConfig, *, seed: int = 0) -> Augmentation | None:
    """The augmentation `config` describes, or None when it moves nothing."""
    return Augmentation(config, seed) if config.enabled else None
