"""The rows of an `aet embed` job: which source row each output row is, and a block reader.

Output rows are numbered 0..N-1 in train, val, test order, the cut `load_dataset` makes. A
`RowPlan` records, for every output row, its position in the source files and its label; it is
computed from the labels alone (`training.data.cut_dataset` on row positions), so planning a
job never reads a pixel. `RowPlan.block(start, stop)` then reads the pixels of one block of
rows wherever it runs: in the job's own process, or on a Ray worker, through the data set's
loader in `training.data`, once per process: uncompressed IDX files and stored npz images are
memory-mapped there (`training.mapped`), so a reader holds one block of pixels at a time
whatever the size of the files; other data sets are read whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aet.training.data import (
    DATASETS,
    DataError,
    LoadedImages,
    Split,
    TableOptions,
    cut_dataset,
)
from aet.training.dataspec import DataSpec

SPLITS = ("train", "val", "test")
NO_LABEL = -1  # the label of rows from unlabelled data sets


def raw_pixels(x: np.ndarray, raw_max: float) -> np.ndarray:
    """Images in [0, 1] back in the raw range the exported graph expects, `[0, raw_max]`.

    Pixels that were bytes (digits 0..16, 8-bit images 0..255) come back exactly as uint8, a
    quarter of the bytes on the wire; anything else stays float32.
    """
    scaled = x * np.float32(raw_max)
    if raw_max <= 255:
        rounded = np.rint(scaled)
        if np.abs(scaled - rounded).max(initial=0.0) < 1e-3:
            return rounded.astype(np.uint8)
    return scaled.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _read(
    name: str, path: Path | None, table: TableOptions, image_size: int | None
) -> LoadedImages:
    """A whole data set through its `training.data` loader, once per process."""
    return DATASETS[name](path, image_size=image_size, channels=None, table=table)


def _loaded(spec: DataSpec) -> LoadedImages:
    columns = spec.columns
    table = TableOptions(
        None if columns is None else tuple(columns), spec.label_column, bool(spec.drop_missing)
    )
    return _read(spec.name, spec.data_path, table, spec.image_size)


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowPlan:
    """Every output row of a job: its source position and label; train, val, test in order."""

    dataset: DataSpec  # the data set and split
    positions: np.ndarray  # (N,) int64: the row's position in the source
    labels: np.ndarray  # (N,) int64, NO_LABEL when unlabelled
    sizes: tuple[int, ...]  # rows of train, val, test
    image_shape: tuple[int, ...]  # (C, H, W), or (D,) for a table of features
    raw_max: float
    is_vectors: bool = False  # a table of features: rows go out in their own units

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def name(self) -> str:
        return self.dataset.name

    def split_of(self, ids: np.ndarray) -> np.ndarray:
        """The split name ("train", "val", "test") of each output row id."""
        return np.asarray(SPLITS)[np.searchsorted(np.cumsum(self.sizes), ids, side="right")]

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """Raw pixels (stop - start, C, H, W) of output rows [start, stop); for vectors, the
        float32 features (stop - start, D) as read (the graph standardises them)."""
        positions = self.positions[start:stop]
        loaded = _loaded(self.dataset)
        pool = len(loaded.pool)
        in_pool = positions < pool
        x = np.empty((len(positions), *loaded.pool.x.shape[1:]), loaded.pool.x.dtype)
        x[in_pool] = loaded.pool.x[positions[in_pool]]
        if not in_pool.all():
            # Positions past the pool exist only where the files define their own test set.
            assert loaded.official_test is not None
            x[~in_pool] = loaded.official_test.x[positions[~in_pool] - pool]
        return x.astype(np.float32) if self.is_vectors else raw_pixels(x, loaded.raw_max)

    def block(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Output rows [start, stop): id, label, split and raw pixels."""
        ids = np.arange(start, stop, dtype=np.int64)
        return {
            "id": ids,
            "label": self.labels[start:stop],
            "split": self.split_of(ids),
            "pixels": self.pixels(start, stop),
        }


def plan_rows(spec: DataSpec) -> RowPlan:
    """The `RowPlan` of `spec.load()`, read from the labels only where possible."""
    spec = spec.with_defaults()
    if spec.name not in DATASETS:
        raise DataError(f"unknown data set {spec.name!r}; valid data sets: {', '.join(DATASETS)}")
    images = _loaded(spec)  # mapped files: no pixel read
    loaded = LoadedImages(
        pool=Split(np.arange(len(images.pool)), images.pool.y),
        raw_max=images.raw_max,
        origin={},
        default_test_fraction=images.default_test_fraction,
        official_test=None
        if images.official_test is None
        else Split(
            len(images.pool) + np.arange(len(images.official_test)),
            images.official_test.y,
        ),
    )
    assert spec.seed is not None and spec.val_fraction is not None  # with_defaults
    cut = cut_dataset(
        spec.name,
        loaded,
        seed=spec.seed,
        test_fraction=spec.test_fraction,
        val_fraction=spec.val_fraction,
        limit=spec.limit,
    )
    parts = [cut.train, cut.val, cut.test]
    labels = [np.full(len(p), NO_LABEL, np.int64) if p.y is None else p.y for p in parts]
    return RowPlan(
        dataset=spec,
        positions=np.concatenate([p.x for p in parts]).astype(np.int64),
        labels=np.concatenate(labels),
        sizes=tuple(len(p) for p in parts),
        image_shape=tuple(int(d) for d in images.pool.x.shape[1:]),
        raw_max=loaded.raw_max,
        is_vectors=images.feature_names is not None,
    )
