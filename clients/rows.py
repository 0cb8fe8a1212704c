"""The rows of an `aet embed` job: which source row each output row is, and a block reader.

Output rows are numbered 0..N-1 in train, val, test order, the cut `load_dataset` makes. A
`RowPlan` records, for every output row, its position in the source files and its label; it is
computed from the labels alone (`training.data.cut_dataset` on row positions), so planning a
job never reads a pixel. `RowPlan.block(start, stop)` then reads the pixels of one block of
rows wherever it runs: in the job's own process, or on a Ray worker. MNIST-format IDX files
that are not compressed are memory-mapped for each block, so a reader holds one block at a
time whatever the size of the files; the other data sets are read once per process by their
loader in `training.data`.
"""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aet.training.data import (
    DATASETS,
    IDX_PARTS,
    DataError,
    LoadedImages,
    Split,
    TableOptions,
    cut_dataset,
    default_mnist_dir,
    find_idx_folder,
    idx_file,
    read_idx,
)

SPLITS = ("train", "val", "test")
NO_LABEL = -1  # the label of rows from unlabelled data sets
_GZIP_MAGIC = b"\x1f\x8b"


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


# --- MNIST-format IDX files, block by block --------------------------------------------------


@dataclass(frozen=True)
class IdxImages:
    """One IDX image file: where its uint8 pixels start, and their shape (N, H, W)."""

    path: str
    compressed: bool
    offset: int
    shape: tuple[int, int, int]

    @classmethod
    def open(cls, path: Path) -> IdxImages:
        with open(path, "rb") as handle:
            head = handle.read(16)
        if head[:2] == _GZIP_MAGIC:
            images = read_idx(path)  # a compressed file cannot be mapped: read it once
            offset, shape = 0, images.shape
        else:
            if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
                raise DataError(
                    f"{path}: expected uint8 images (N, H, W), magic 0x00000803; got "
                    f"0x{head[:4].hex()}"
                )
            offset, shape = 16, tuple(int(d) for d in np.frombuffer(head, ">u4", 3, 4))
            expected = offset + math.prod(shape)
            if path.stat().st_size != expected:
                raise DataError(
                    f"{path}: header declares shape {shape} ({expected} bytes), file holds "
                    f"{path.stat().st_size} bytes"
                )
        if len(shape) != 3:
            raise DataError(f"{path}: expected images (N, H, W); got shape {shape}")
        return cls(str(path), head[:2] == _GZIP_MAGIC, offset, tuple(shape))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Pixels (len(rows), 1, H, W) uint8 of the given rows (increasing positions)."""
        if self.compressed:
            return _decompressed_idx(self.path)[rows][:, None]
        with (
            open(self.path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        ):
            images = np.frombuffer(mapped, np.uint8, math.prod(self.shape), self.offset)
            taken = images.reshape(self.shape)[rows][:, None]  # fancy indexing copies
            del images  # no view may outlive the mapping, whose pages leave with it
        return taken


@functools.lru_cache(maxsize=2)
def _decompressed_idx(path: str) -> np.ndarray:
    return read_idx(Path(path))


def _idx_source(path: Path | None) -> tuple[list[IdxImages], LoadedImages]:
    """The image files of an IDX folder, and its labels as a `LoadedImages` of row positions."""
    folder = find_idx_folder(default_mnist_dir() if path is None else path)
    files: list[IdxImages] = []
    parts: list[Split] = []
    for part in IDX_PARTS:
        images_path, labels_path = (
            idx_file(folder, part, "images"),
            idx_file(folder, part, "labels"),
        )
        if images_path is None or labels_path is None:
            continue
        images, labels = IdxImages.open(images_path), read_idx(labels_path)
        if labels.ndim != 1 or len(labels) != images.shape[0]:
            raise DataError(
                f"{labels_path}: expected {images.shape[0]} labels (N,) for {images_path.name}; "
                f"got shape {labels.shape}"
            )
        start = sum(f.shape[0] for f in files)
        files.append(images)
        parts.append(Split(np.arange(start, start + len(labels)), labels.astype(np.int64)))
    if not files:
        raise DataError(f"{folder}: no pair of IDX image and label files")
    if len({f.shape[1:] for f in files}) > 1:
        raise DataError(f"{folder}: train and t10k images differ in shape")
    loaded = LoadedImages(
        pool=parts[0],
        raw_max=255.0,
        origin={},
        default_test_fraction=0.2,
        official_test=parts[1] if len(parts) == 2 else None,
    )
    return files, loaded


@functools.lru_cache(maxsize=1)
def _loaded(name: str, path: str | None, table: TableOptions) -> LoadedImages:
    """A whole data set through its `training.data` loader, once per process."""
    return DATASETS[name](
        None if path is None else Path(path), image_size=None, channels=None, table=table
    )


def _table_options(dataset: dict[str, Any]) -> TableOptions:
    """The table options (columns, label column, drop missing) of `load_dataset` arguments."""
    columns = dataset.get("columns")
    return TableOptions(
        None if columns is None else tuple(columns),
        dataset.get("label_column"),
        bool(dataset.get("drop_missing", False)),
    )


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowPlan:
    """Every output row of a job: its source position and label; train, val, test in order."""

    dataset: dict[str, Any]  # load_dataset arguments: name, path, seed, fractions, limit
    positions: np.ndarray  # (N,) int64: the row's position in the source
    labels: np.ndarray  # (N,) int64, NO_LABEL when unlabelled
    sizes: tuple[int, ...]  # rows of train, val, test
    image_shape: tuple[int, ...]  # (C, H, W), or (D,) for a table of features
    raw_max: float
    idx_files: tuple[IdxImages, ...] = ()  # set for MNIST-format IDX folders
    is_vectors: bool = False  # a table of features: rows go out in their own units

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def name(self) -> str:
        return self.dataset["name"]

    def split_of(self, ids: np.ndarray) -> np.ndarray:
        """The split name ("train", "val", "test") of each output row id."""
        return np.asarray(SPLITS)[np.searchsorted(np.cumsum(self.sizes), ids, side="right")]

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """Raw pixels (stop - start, C, H, W) of output rows [start, stop); for vectors, the
        float32 features (stop - start, D) as read (the graph standardises them)."""
        positions = self.positions[start:stop]
        if self.idx_files:
            firsts = np.cumsum([0] + [f.shape[0] for f in self.idx_files])
            owner = np.searchsorted(firsts, positions, side="right") - 1
            parts = [
                file.take(positions[owner == i] - firsts[i])
                for i, file in enumerate(self.idx_files)
                if (owner == i).any()
            ]
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        loaded = _loaded(self.dataset["name"], self.dataset["path"], _table_options(self.dataset))
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


def plan_rows(dataset: dict[str, Any]) -> RowPlan:
    """The `RowPlan` of `load_dataset(**dataset)`, read from the labels only where possible."""
    name, path = dataset["name"], dataset["path"]
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid data sets: {', '.join(DATASETS)}")
    idx_files: Sequence[IdxImages]
    image_shape: tuple[int, ...]
    if name == "mnist-idx":
        idx_files, loaded = _idx_source(None if path is None else Path(path))
        image_shape = (1, *idx_files[0].shape[1:])
        is_vectors = False
    else:
        idx_files, images = (), _loaded(name, path, _table_options(dataset))
        is_vectors = images.feature_names is not None
        image_shape = tuple(int(d) for d in images.pool.x.shape[1:])
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
    cut = cut_dataset(
        name,
        loaded,
        seed=dataset["seed"],
        test_fraction=dataset.get("test_fraction"),
        val_fraction=dataset.get("val_fraction", 0.1),
        limit=dataset["limit"],
    )
    parts = [cut.train, cut.val, cut.test]
    labels = [np.full(len(p), NO_LABEL, np.int64) if p.y is None else p.y for p in parts]
    return RowPlan(
        dataset=dict(dataset),
        positions=np.concatenate([p.x for p in parts]).astype(np.int64),
        labels=np.concatenate(labels),
        sizes=tuple(len(p) for p in parts),
        image_shape=image_shape,
        raw_max=loaded.raw_max,
        idx_files=tuple(idx_files),
        is_vectors=is_vectors,
    )
