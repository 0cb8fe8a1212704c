"""Data sets for pretraining: one registry of loaders, fixed seeded splits.

Every loader returns images as float32 `(N, C, H, W)` in [0, 1] (raw pixel / `raw_max`) and
int64 labels when the source has them. `load_dataset` then cuts a seeded, stratified
train / validation / test split, identical on every machine for the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aet.config import ConfigError
from aet.errors import UserError


class DataError(UserError):
    """A data file or folder is missing or malformed; the message names the file and the fault."""


@dataclass(frozen=True)
class Split:
    """One part of a data set: images (N, C, H, W) float32 in [0, 1], labels (N,) int64 or None."""

    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Dataset:
    """A data set cut into train / val / test, plus what model.json needs to describe it."""

    name: str
    train: Split
    val: Split
    test: Split
    raw_max: float  # raw pixel value that maps to 1.0
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int | None
    source: dict  # origin, split sizes, seed and fractions: JSON-serialisable, for model.json

    @property
    def fit(self) -> Split:
        """Train + val: everything a probe may learn from ("all training labels")."""
        y = None if self.train.y is None else np.concatenate([self.train.y, self.val.y])
        return Split(np.concatenate([self.train.x, self.val.x]), y)


@dataclass(frozen=True)
class LoadedImages:
    """What a loader reads, before splitting.

    `official_test` is set when the files define their own test set (MNIST's t10k files next to
    the train files); `pool` is then the official training part.
    """

    pool: Split
    raw_max: float
    origin: dict  # where the data came from: a path or a library function, plus file names
    default_test_fraction: float
    official_test: Split | None = None


Loader = Callable[..., LoadedImages]  # (path, *, image_size, channels) -> LoadedImages


def _fixed_shape_only(name: str, path: Path | None, image_size: int | None,
                      channels: int | None, shape: tuple[int, int, int]) -> None:
    """Reject resizing / channel conversion for data sets stored at one fixed shape."""
    if image_size is not None and shape[1:] != (image_size, image_size):
        raise ConfigError(f"image_size: {name} images are {shape[1]}x{shape[2]} and are not "
                          f"resized (only image-folder resizes); got image_size={image_size}")
    if channels is not None and channels != shape[0]:
        raise ConfigError(f"channels: {name} images have {shape[0]} channel(s); "
                          f"got channels={channels}")


def _load_digits(path: Path | None, *, image_size: int | None,
                 channels: int | None) -> LoadedImages:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), bundled with the library."""
    from sklearn.datasets import load_digits

    if path is not None:
        raise ConfigError(f"path: the digits data set is bundled with scikit-learn and takes "
                          f"no path; got {path}")
    _fixed_shape_only("digits", path, image_size, channels, (1, 8, 8))
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None]  # (N, 1, 8, 8)
    return LoadedImages(pool=Split(x, bunch.target.astype(np.int64)), raw_max=16.0,
                        origin={"origin": "sklearn.datasets.load_digits"},
                        default_test_fraction=0.3)


DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
}


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{name}: expected a fraction in {interval}; got {value}")


def _take(split: Split, index: np.ndarray) -> Split:
    return Split(split.x[index], None if split.y is None else split.y[index])


def _shuffled_prefix(split: Split, count: int, rng: np.random.Generator) -> Split:
    """The first `count` examples of a seeded shuffle (used by `limit`)."""
    return _take(split, np.sort(rng.permutation(len(split))[:count]))


def _stratifiable(y: np.ndarray | None, n_held_out: int) -> bool:
    """sklearn's stratified split needs >= 2 examples per class and a part per class on each side."""
    if y is None:
        return False
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return counts.min() >= 2 and min(n_held_out, len(y) - n_held_out) >= len(counts)


def _hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split, bool]:
    """Cut `fraction` of `split` off (rounded up), stratified by label when possible.

    Returns (kept, held out, stratified).
    """
    from sklearn.model_selection import train_test_split

    n_held_out = int(np.ceil(fraction * len(split)))
    index = np.arange(len(split))
    if n_held_out == 0:
        return split, _take(split, index[:0]), False
    stratified = _stratifiable(split.y, n_held_out)
    kept, held_out = train_test_split(index, test_size=n_held_out, random_state=seed,
                                      stratify=split.y if stratified else None)
    return _take(split, np.sort(kept)), _take(split, np.sort(held_out)), stratified


def load_dataset(name: str, path: str | Path | None = None, *, seed: int = 0,
                 test_fraction: float | None = None, val_fraction: float = 0.1,
                 image_size: int | None = None, limit: int | None = None,
                 channels: int | None = None) -> Dataset:
    """Load data set `name` (a key of `DATASETS`) and cut its seeded train / val / test split.

    `test_fraction=None` uses the data set's own test set when its files define one (MNIST's
    t10k next to train), else its default fraction (digits 0.3, others 0.2); an explicit
    fraction re-splits all the data. `val_fraction` is taken from what remains after the test
    part. `limit` keeps the first N examples of a seeded shuffle (for quick runs).
    `image_size` and `channels` apply to image-folder (resize, grey or RGB).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid data sets: {', '.join(DATASETS)}")
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction, allow_zero=False)
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: expected a positive number of examples; got {limit}")
    loaded = DATASETS[name](None if path is None else Path(path), image_size=image_size,
                            channels=channels)
    pool, official_test = loaded.pool, loaded.official_test
    if official_test is not None and test_fraction is not None:
        pool = Split(np.concatenate([pool.x, official_test.x]),
                     None if pool.y is None else np.concatenate([pool.y, official_test.y]))
        official_test = None
    labels = pool.y if official_test is None else np.concatenate([pool.y, official_test.y])
    num_classes = None if labels is None else int(labels.max()) + 1

    rng = np.random.default_rng(seed)
    if limit is not None:
        total = len(pool) + (0 if official_test is None else len(official_test))
        if limit < total:
            pool_share = round(limit * len(pool) / total)
            if official_test is not None:
                official_test = _shuffled_prefix(official_test, limit - pool_share, rng)
            pool = _shuffled_prefix(pool, pool_share, rng)

    if official_test is None:
        fraction = loaded.default_test_fraction if test_fraction is None else test_fraction
        fit, test, test_stratified = _hold_out(pool, fraction, seed)
    else:
        fit, test, test_stratified = pool, official_test, False
    train, val, val_stratified = _hold_out(fit, val_fraction, seed)

    source = {
        "name": name,
        **loaded.origin,
        "seed": seed,
        "test_fraction": "official" if official_test is not None else fraction,
        "val_fraction": val_fraction,
        "limit": limit,
        "stratified": {"test": test_stratified, "val": val_stratified},
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
    }
    return Dataset(name=name, train=train, val=val, test=test, raw_max=loaded.raw_max,
                   image_shape=tuple(int(d) for d in pool.x.shape[1:]),
                   num_classes=num_classes, source=source)
