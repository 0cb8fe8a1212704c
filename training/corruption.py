"""Input corruptions for denoising autoencoders (Vincent et al., JMLR 2010, section 4.3).

Each function returns a corrupted copy of a float tensor and never touches its input. Entries
are corrupted independently, with one vectorised random draw from the given `torch.Generator`,
so a training step pays one `torch.rand`-sized kernel. The training loop applies a corruption
to the encoder's input in training only; validation, evaluation and export see clean inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aet.config import ConfigError


def _check_sigma(sigma: float, kind: str) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"noise level: {kind} needs a finite sigma >= 0; got {sigma}")


def _check_fraction(fraction: float, kind: str) -> None:
    if not 0 <= fraction < 1:
        raise ConfigError(f"noise level: {kind} needs a fraction nu in [0, 1); got {fraction}")


def gaussian(
    x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`x` plus isotropic Gaussian noise N(0, sigma^2) on every entry (not clipped)."""
    _check_sigma(sigma, "gaussian")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return noise.mul_(sigma).add_(x)  # x + sigma * noise, bit for bit, with one buffer


def masking(
    x: torch.Tensor, fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`x` with each entry set to 0 with probability `fraction` (masking noise)."""
    _check_fraction(fraction, "masking")
    masked = torch.rand(x.shape, generator=generator, device=x.device) < fraction
    return x.masked_fill(masked, 0.0)


def salt_and_pepper(
    x: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """`x` with each entry set, with probability `fraction`, to `low` or `high` (half each)."""
    _check_fraction(fraction, "salt-and-pepper")
    draw = torch.rand(x.shape, generator=generator, device=x.device)
    # One draw decides both: [0, f/2) -> low (pepper), [f/2, f) -> high (salt), else unchanged.
    salted = x.masked_fill((draw >= fraction / 2) & (draw < fraction), high)
    return salted.masked_fill(draw < fraction / 2, low)


@dataclass(frozen=True)
class _Kind:
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    check: Callable[[float, str], None]


_KINDS: dict[str, _Kind] = {
    "gaussian": _Kind(gaussian, _check_sigma),
    "masking": _Kind(masking, _check_fraction),
    "salt-and-pepper": _Kind(salt_and_pepper, _check_fraction),
}
CORRUPTION_KINDS: tuple[str, ...] = ("none", *_KINDS)  # valid `kind` values, e.g. for choices=


def _check_kind(kind: str, valid: tuple[str, ...]) -> None:
    if kind not in valid:
        raise ConfigError(
            f"noise: unknown corruption {kind!r}; valid corruptions: {', '.join(valid)}"
        )


@dataclass(frozen=True, eq=False)
class Corruption:
    """A validated corruption with its own seeded generator: `corrupt(x)` -> corrupted copy.

    `level` is sigma for `gaussian` and the corrupted fraction nu for `masking` and
    `salt-and-pepper`. The generator's state (`corrupt.generator.get_state()`) belongs in a
    checkpoint so a resumed run draws the same noise.
    """

    kind: str
    level: float
    seed: int = 0
    device: torch.device | str = "cpu"  # where the batches (and so the generator) live
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind, tuple(_KINDS))
        _KINDS[self.kind].check(self.level, self.kind)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        object.__setattr__(self, "generator", generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Corrupted copy of the batch `x` (training inputs only)."""
        return _KINDS[self.kind].apply(x, self.level, self.generator)


def build_corruption(
    kind: str | None, level: float, *, seed: int = 0, device: torch.device | str = "cpu"
) -> Corruption | None:
    """The corruption `kind` at `level`, or None for `kind` None / "none" (plain autoencoder).

    Raises ConfigError for an unknown kind (listing the valid ones), a fraction outside [0, 1)
    or a negative sigma, so a bad configuration fails before any training.
    """
    if kind is None:
        return None
    _check_kind(kind, CORRUPTION_KINDS)
    return None if kind == "none" else Corruption(kind, level, seed, device)
