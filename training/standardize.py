"""Feature standardisation learned on training rows: `(x - mean) / std`, per feature.

One definition for every place that needs it: `aet.AutoencoderEmbedder` standardises arbitrary
real-valued features before its Gaussian (MSE) autoencoder sees them, and an exported graph for
vector data bakes the same step in front of the encoder (`training.export.StandardizeModule`),
so raw features go in on both paths. This module needs numpy only: `aet embed` reads tables
through it without importing torch. The statistics travel in `model.json` (`to_dict` /
`from_dict`) and in checkpoints.

A feature that is constant on the training rows has std 0; it is divided by 1 instead (as
scikit-learn's `StandardScaler` does), so it maps to 0 rather than to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aet.errors import UserError


class StandardizerError(UserError):
    """Rows cannot be standardised: wrong shape, non-finite values, or a malformed record."""


@dataclass(frozen=True, eq=False)
class FeatureStandardizer:
    """Per-feature mean and standard deviation, float32 arrays of the feature shape.

    Parameters
    ----------
    mean : ndarray of shape feature_shape, float32
    std : ndarray of shape feature_shape, float32, every entry > 0
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if mean.shape != std.shape:
            raise StandardizerError(
                f"std: expected the shape of mean {mean.shape}; got {std.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise StandardizerError("mean, std: expected finite values and std > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @classmethod
    def fit(cls, x: np.ndarray) -> FeatureStandardizer:
        """Learn mean and std over the rows of `x`, shape (N, *feature_shape), N >= 1.

        Statistics are accumulated in float64 and stored as float32.
        """
        x = np.asarray(x)
        if x.ndim < 2 or len(x) == 0:
            raise StandardizerError(f"x: expected shape (N >= 1, *features); got {x.shape}")
        rows = x.astype(np.float64, copy=False)
        if not np.isfinite(rows).all():
            raise StandardizerError("x: expected finite values; got NaN or Inf")
        std = rows.std(axis=0)
        return cls(rows.mean(axis=0), np.where(std > 0, std, 1.0))

    def _check_rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[1:] != self.feature_shape:
            raise StandardizerError(
                f"x: expected shape (N, {', '.join(map(str, self.feature_shape))}); got {x.shape}"
            )
        return x

    def transform(self, x: np.ndarray) -> np.ndarray:
        """`(x - mean) / std` as float32, shape (N, *feature_shape) like `x`."""
        x = self._check_rows(x)
        return ((x.astype(np.float32, copy=False) - self.mean) / self.std).astype(np.float32)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """`z * std + mean` as float32: standardised rows back in the original units."""
        z = self._check_rows(z)
        return (z.astype(np.float32, copy=False) * self.std + self.mean).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (model.json, checkpoints): shape and flat float lists."""
        return {
            "kind": "standardize",
            "shape": list(self.feature_shape),
            "mean": self.mean.ravel().tolist(),
            "std": self.std.ravel().tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "standardizer") -> FeatureStandardizer:
        """Read a `to_dict` record back; errors name `source` and the field."""
        if not isinstance(data, dict) or data.get("kind") != "standardize":
            raise StandardizerError(
                f"{source}: expected a mapping with kind 'standardize'; got {data!r:.80}"
            )
        try:
            shape = tuple(int(d) for d in data["shape"])
            mean = np.asarray(data["mean"], dtype=np.float32).reshape(shape)
            std = np.asarray(data["std"], dtype=np.float32).reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise StandardizerError(
                f"{source}: expected fields shape, mean and std of matching sizes ({exc})"
            ) from exc
        try:
            return cls(mean, std)
        except StandardizerError as exc:
            raise StandardizerError(f"{source}: {exc}") from exc
