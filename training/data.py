"""Data sets for pretraining: one registry of loaders, fixed seeded splits.

Image loaders return float32 `(N, C, H, W)` in [0, 1] (raw pixel / `raw_max`); vector loaders
(csv, parquet, a 2-D npz `x`, the bundled wine and breast-cancer tables) return float32 `(N, D)`
numeric features with their names. Both give int64 labels when the source has them.
`load_dataset` then cuts a seeded, stratified train / validation / test split, identical on
every machine for the same arguments, and standardises vectors per feature with statistics
fitted on the training split only (`Dataset.standardizer`, baked into the exported graph).
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet
from PIL import Image, UnidentifiedImageError

from aet.config import ConfigError
from aet.errors import UserError
from aet.training.mapped import CHUNK_ROWS, Images, MappedImages, stored_npz_member
from aet.training.standardize import FeatureStandardizer


class DataError(UserError):
    """A data file or folder is missing or malformed; the message names the file and the fault."""


@dataclass(frozen=True)
class Split:
    """One part of a data set: images (N, C, H, W) float32 in [0, 1] or standardised vectors
    (N, D) float32, and labels (N,) int64 or None."""

    x: Images  # MappedImages: left on disk, read when indexed
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
    raw_max: float  # raw pixel value that maps to 1.0 (1.0 for vectors: unused)
    image_shape: tuple[int, ...]  # one row: (C, H, W) for images, (D,) for vectors
    num_classes: int | None
    source: dict  # origin, split sizes, seed and fractions: JSON-serialisable, for model.json
    feature_names: tuple[str, ...] | None = None  # vectors only: the D feature columns
    standardizer: FeatureStandardizer | None = None  # vectors only: fitted on `train`

    @property
    def fit(self) -> Split:
        """Train + val: everything a probe may learn from ("all training labels")."""
        return _concat(self.train, self.val)

    @property
    def is_vectors(self) -> bool:
        """True for tables of features (Gaussian model), False for images in [0, 1]."""
        return self.standardizer is not None

    def raw(self, x: Images) -> np.ndarray:
        """Rows of a split back in the units the exported graph takes: pixels in
        [0, raw_max], or vectors before standardisation."""
        x = np.asarray(x)
        if self.standardizer is not None:
            return self.standardizer.inverse_transform(x)
        return (x * np.float32(self.raw_max)).astype(np.float32)


def _concat(first: Split, second: Split) -> Split:
    """`first` then `second`; rows of one mapped file stay on disk, anything else is read."""
    y = None if first.y is None else np.concatenate([first.y, second.y])
    if isinstance(first.x, MappedImages) and first.x.same_file(second.x):
        assert isinstance(second.x, MappedImages)
        return Split(first.x.joined(second.x), y)
    return Split(np.concatenate([np.asarray(first.x), np.asarray(second.x)]), y)


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
    feature_names: tuple[str, ...] | None = None  # set for vectors: raw (N, D) features


@dataclass(frozen=True)
class TableOptions:
    """How to read a table of features (csv, parquet, a 2-D npz `x`)."""

    columns: tuple[str, ...] | None = None  # feature columns; None: every column but the label
    label_column: str | None = None  # integer or string class labels; None: unlabelled
    drop_missing: bool = False  # drop rows with a missing, NaN or infinite value instead of failing

    @property
    def given(self) -> list[str]:
        """The options set away from their defaults, by flag name."""
        named = {
            "columns": self.columns is not None,
            "label_column": self.label_column is not None,
            "drop_missing": self.drop_missing,
        }
        return [name for name, set_ in named.items() if set_]


class Loader(Protocol):
    """One entry of `DATASETS`: reads a data set in full, before any split."""

    def __call__(
        self,
        path: Path | None,
        *,
        image_size: int | None,
        channels: int | None,
        table: TableOptions,
    ) -> LoadedImages: ...


def _fixed_shape_only(
    name: str, image_size: int | None, channels: int | None, shape: tuple[int, ...]
) -> None:
    """Reject resizing / channel conversion for data sets stored at one fixed shape."""
    if image_size is not None and shape[1:] != (image_size, image_size):
        raise ConfigError(
            f"image_size: {name} images are {shape[1]}x{shape[2]} and are not "
            f"resized (only image-folder resizes); got image_size={image_size}"
        )
    if channels is not None and channels != shape[0]:
        raise ConfigError(
            f"channels: {name} images have {shape[0]} channel(s); got channels={channels}"
        )


def _load_digits(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), bundled with the library."""
    if path is not None:
        raise ConfigError(
            f"path: the digits data set is bundled with scikit-learn and takes no path; got {path}"
        )
    _table_options_unused("digits images", table)
    _fixed_shape_only("digits", image_size, channels, (1, 8, 8))
    from sklearn.datasets import load_digits  # here: importing scikit-learn takes seconds

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None]  # (N, 1, 8, 8)
    return LoadedImages(
        pool=Split(x, bunch.target.astype(np.int64)),
        raw_max=16.0,
        origin={"origin": "sklearn.datasets.load_digits"},
        default_test_fraction=0.3,
    )


# --- MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST) ----------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_PARTS = ("train", "t10k")  # official training and test sets, in that order


def default_mnist_dir() -> Path:
    """`$AET_MNIST_DIR` if set, else `../shared/data/mnist` beside the checkout."""
    override = os.environ.get("AET_MNIST_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if raw[:2] != b"\x1f\x8b":  # gzip magic; IDX files start with two zero bytes
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip data ({exc})") from exc


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not): magic 0x0000TTDD, DD big-endian dims, data."""
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte magic")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}; expected 0x0000TTDD with type "
            f"code TT in {{08, 09, 0b, 0c, 0d, 0e}} and DD >= 1 dimensions "
            f"(0x00000803 for images, 0x00000801 for labels)"
        )
    ndim, dtype = data[3], _IDX_DTYPES[data[2]]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, the header alone needs {header}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        fault = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(
            f"{path}: {fault}: header declares shape {dims} ({expected} bytes), "
            f"file holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype, math.prod(dims), header).reshape(dims)


def _mapped_idx_images(path: Path) -> np.ndarray:
    """An IDX file as a read-only memory map when it is uncompressed, else read (`read_idx`)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head[:2] == b"\x1f\x8b" or len(head) < 4 or head[:3] != b"\x00\x00\x08" or not head[3]:
            return read_idx(path)  # compressed, or a bad header whose fault `read_idx` names
        dims = np.frombuffer(handle.read(4 * head[3]), ">u4")
    header, shape = 4 + 4 * head[3], tuple(int(d) for d in dims)
    if len(shape) != head[3] or path.stat().st_size != header + math.prod(shape):
        return read_idx(path)  # truncated or trailing bytes: `read_idx` names the fault
    return np.memmap(path, np.uint8, "r", header, shape)


def idx_file(folder: Path, part: str, kind: str) -> Path | None:
    """`<part>-<kind>-idxN-ubyte`, uncompressed or `.gz`, if present in `folder`."""
    stem = f"{part}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return next((folder / name for name in (stem, stem + ".gz") if (folder / name).is_file()), None)


def _has_idx_files(folder: Path) -> bool:
    return any(idx_file(folder, part, kind) for part in IDX_PARTS for kind in ("images", "labels"))


def find_idx_folder(root: Path) -> Path:
    """The one folder holding the IDX files: `root`, `root/raw` or `root/<Name>/raw`."""
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder; pass the folder of MNIST-format IDX files "
            f"(or set AET_MNIST_DIR)"
        )
    found = [f for f in (root, root / "raw", *sorted(root.glob("*/raw"))) if _has_idx_files(f)]
    if not found:
        raise DataError(
            f"{root}: no MNIST-format IDX files; expected t10k-images-idx3-ubyte[.gz] "
            f"and t10k-labels-idx1-ubyte[.gz] (optionally train-...) in {root}, "
            f"{root / 'raw'} or {root}/<Name>/raw"
        )
    if len(found) > 1:
        raise DataError(
            f"{root}: IDX files in several folders ({', '.join(map(str, found))}); "
            f"pass the one to use"
        )
    return found[0]


def _read_idx_part(folder: Path, part: str) -> tuple[Split, list[str]] | None:
    """Images and labels of one part (`train` or `t10k`), or None if neither file is there."""
    images_path, labels_path = idx_file(folder, part, "images"), idx_file(folder, part, "labels")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        kind = "images" if images_path is None else "labels"
        present = labels_path if images_path is None else images_path
        assert present is not None  # the case of neither file returned above
        raise DataError(
            f"{folder}: missing file {part}-{kind}-idx{3 if kind == 'images' else 1}"
            f"-ubyte[.gz] to go with {present.name}"
        )
    images, labels = _mapped_idx_images(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_path}: expected uint8 images (N, H, W), magic 0x00000803; "
            f"got {images.dtype} with shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels (N,), magic 0x00000801; "
            f"got {labels.dtype} with shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels, but {images_path.name} holds "
            f"{len(images)} images"
        )
    if isinstance(images, np.memmap):  # left on disk: (N, 1, H, W) read when indexed
        assert images.offset is not None
        x: np.ndarray | MappedImages = MappedImages.whole(
            images_path, images.offset, images.dtype, (len(images), 1, *images.shape[1:]), 255.0
        )
    else:
        x = (images.astype(np.float32) / np.float32(255.0))[:, None]  # (N, 1, H, W)
    return Split(x, labels.astype(np.int64)), [images_path.name, labels_path.name]


def _load_mnist_idx(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """A folder of MNIST-format IDX files; train + t10k give the official split."""
    _table_options_unused("mnist-idx images", table)
    folder = find_idx_folder(default_mnist_dir() if path is None else path)
    parts = {part: read for part in IDX_PARTS if (read := _read_idx_part(folder, part))}
    splits = [split for split, _ in parts.values()]
    shapes = {split.x.shape[1:] for split in splits}
    if len(shapes) > 1:
        raise DataError(f"{folder}: train and t10k images differ in shape: {sorted(shapes)}")
    _fixed_shape_only("mnist-idx", image_size, channels, splits[0].x.shape[1:])
    origin = {
        "path": str(folder.resolve()),
        "files": [name for _, names in parts.values() for name in names],
    }
    official_test = splits[1] if len(splits) == 2 else None
    return LoadedImages(
        pool=splits[0],
        raw_max=255.0,
        origin=origin,
        default_test_fraction=0.2,
        official_test=official_test,
    )


# --- .npz arrays ------------------------------------------------------------------------------


def _require_path(name: str, path: Path | None) -> Path:
    if path is None:
        raise ConfigError(f"path: the {name} data set needs a path; got none")
    return path


def require_classes(dataset: Dataset, purpose: str) -> None:
    """DataError when the fit rows of a labelled `dataset` hold fewer than two classes:
    `purpose` (probes, a classifier) could only fail, after all the work before it."""
    y = dataset.fit.y
    if y is not None and len(classes := np.unique(y)) < 2:
        raise DataError(
            f"data set {dataset.name}: the labels of its {len(y)} fit rows hold one class "
            f"({', '.join(map(str, classes.tolist())) or 'none'}); {purpose}: at least two needed"
        )


def _npz_image_shape(path: Path, x: np.ndarray) -> tuple[int, int, int]:
    """(C, H, W) of the images stored in array `x`: (N, H, W) or (N, C, H, W)."""
    if x.ndim not in (3, 4):
        raise DataError(
            f"{path}: array 'x' has shape {x.shape}; expected images (N, H, W) or "
            f"(N, C, H, W), or a table of features (N, D)"
        )
    return (1, *x.shape[1:]) if x.ndim == 3 else x.shape[1:]


def _npz_raw_max(path: Path, dtype: np.dtype, chunks: Iterable[np.ndarray]) -> float:
    """The raw value of array `x` that maps to 1.0 (uint8: 255, float in [0, 1]: 1), checked
    over its values chunk by chunk."""
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise DataError(
            f"{path}: array 'x' has dtype {dtype}; expected uint8 (0..255) or float in "
            f"[0, 1] (convert other integer types, e.g. x.astype(np.float32) / x.max())"
        )
    low, high, seen, not_finite, first = math.inf, -math.inf, 0, 0, ""
    for chunk in chunks:
        if dtype != np.uint8 and not (finite := np.isfinite(chunk)).all():
            bad = np.argwhere(~finite)[0]
            where = (seen + int(bad[0]), *(int(i) for i in bad[1:]))
            first = first or f"{chunk[tuple(bad)]} at index {where}"
            not_finite += int((~finite).sum())
        elif chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        seen += len(chunk)
    if not_finite:
        raise DataError(
            f"{path}: array 'x' holds {not_finite} NaN/Inf values (first: {first}); "
            f"expected finite values in [0, 1]"
        )
    if dtype == np.uint8:
        if high <= 1:  # 0/1 bytes: binary images that /255 would turn into noise
            raise DataError(
                f"{path}: array 'x' is uint8 with every value in {{0, 1}}; uint8 pixels are "
                f"read as 0..255 and divided by 255. Store binary images as x * 255 (uint8) "
                f"or as float32 in [0, 1]"
            )
        return 255.0
    if low < 0 or high > 1:
        raise DataError(
            f"{path}: array 'x' has values in [{low}, {high}]; float images must lie "
            f"in [0, 1] (store 8-bit pixels as uint8)"
        )
    return 1.0


def _npz_labels(path: Path, y: np.ndarray, count: int) -> np.ndarray:
    """Class indices (N,) int64 of array `y`; missing (NaN) labels of a float `y` are -1."""
    floating = np.issubdtype(y.dtype, np.floating)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or floating):
        raise DataError(
            f"{path}: array 'y' must be integer labels of shape (N,); "
            f"got {y.dtype} with shape {y.shape}"
        )
    if len(y) != count:
        raise DataError(f"{path}: array 'y' holds {len(y)} labels, but 'x' holds {count} rows")
    if floating:
        return _class_indices(f"{path}: array 'y'", y)
    if y.min() < 0:
        raise DataError(
            f"{path}: array 'y' holds negative label {int(y.min())}; expected class indices >= 0"
        )
    return y.astype(np.int64)


NO_CLASS = -1  # the class index of a row whose label is missing


def _class_indices(what: str, values: np.ndarray) -> np.ndarray:
    """Float labels as class indices, NaN (missing) as `NO_CLASS`; DataError naming the first
    value that is no class index."""
    present = ~np.isnan(values)
    bad = present & ((values != np.round(values)) | (values < 0) | ~np.isfinite(values))
    if bad.any():
        raise DataError(
            f"{what}: label {values[bad][0]} is not a class index; expected integers >= 0 "
            f"(missing labels as NaN) or class names"
        )
    return np.where(present, values, NO_CLASS).astype(np.int64)


def _load_npz(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """A `.npz` archive with `x` and optional integer labels `y`.

    `x` of shape (N, H, W) or (N, C, H, W) holds images (uint8, or float in [0, 1]); `x` of
    shape (N, D) holds a table of D numeric features, named `x0` ... `x{D-1}`.
    """
    path = _require_path("npz", path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise DataError(f"{path}: no array 'x'; found arrays: {archive.files}")
            stored = stored_npz_member(path, "x")
            if stored is not None and len(stored[2]) in (3, 4) and 0 not in stored[2]:
                offset, dtype, shape = stored  # images: left on disk, read when indexed
                x: np.ndarray = np.memmap(path, dtype, "r", offset, shape)
            else:
                x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    if len(x) == 0:
        raise DataError(f"{path}: array 'x' holds no rows (shape {x.shape})")
    labels = None if y is None else _npz_labels(path, y, len(x))
    if x.ndim == 2:
        if table.label_column is not None:
            raise ConfigError(
                f"label_column: an npz archive keeps its labels in array 'y'; "
                f"got label_column={table.label_column!r}"
            )
        columns = pa.table({f"x{j}": x[:, j] for j in range(x.shape[1])})
        return _vectors(str(path), columns, table, {"path": str(path.resolve())}, labels)
    _table_options_unused("npz images", table)
    if labels is not None and (unlabelled := labels == NO_CLASS).any():
        raise DataError(
            f"{path}: array 'y': {int(unlabelled.sum())} of {len(labels)} labels missing (NaN); "
            f"expected a label for every image"
        )
    image_shape = _npz_image_shape(path, x)
    _fixed_shape_only("npz", image_size, channels, image_shape)
    pixels: np.ndarray | MappedImages
    if isinstance(x, np.memmap):
        assert x.offset is not None
        chunks = (x[i : i + CHUNK_ROWS] for i in range(0, len(x), CHUNK_ROWS))
        raw_max = _npz_raw_max(path, x.dtype, chunks)
        pixels = MappedImages.whole(path, x.offset, x.dtype, (len(x), *image_shape), raw_max)
    else:
        raw_max = _npz_raw_max(path, x.dtype, [x])
        pixels = (x.astype(np.float32) / np.float32(raw_max)).reshape(len(x), *image_shape)
    return LoadedImages(
        pool=Split(pixels, labels),
        raw_max=raw_max,
        origin={"path": str(path.resolve())},
        default_test_fraction=0.2,
    )


# --- tables of numeric features (vectors) ------------------------------------------------------

_SHOWN_COLUMNS = 5  # columns named in one error message before "and N more"


def _table_options_unused(name: str, table: TableOptions) -> None:
    """Refuse --columns / --label-column / --drop-missing for data that is not a table."""
    if table.given:
        raise ConfigError(
            f"{', '.join(table.given)}: {name} are not a table of features; columns, "
            f"label_column and drop_missing apply to csv, parquet, npz with a 2-D 'x', wine "
            f"and breast-cancer"
        )


def _name_some(items: list[str]) -> str:
    shown = "; ".join(items[:_SHOWN_COLUMNS])
    more = len(items) - _SHOWN_COLUMNS
    return shown + (f"; and {more} more column(s)" if more > 0 else "")


def _not_numbers(column: pa.ChunkedArray) -> tuple[int, object]:
    """How many values of a text column do not read as numbers, and the first of them."""
    bad = [v for v in column.to_pylist() if v is not None and not _reads_as_number(v)]
    return len(bad), (bad[0] if bad else None)


def _reads_as_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _feature_columns(source: str, table: pa.Table, options: TableOptions) -> list[str]:
    """The feature columns to read: `options.columns`, or every column but the label."""
    names = table.column_names
    if options.label_column is not None and options.label_column not in names:
        raise DataError(
            f"{source}: label column {options.label_column!r} not found; columns: "
            f"{', '.join(names)}"
        )
    if options.columns is None:
        chosen = [n for n in names if n != options.label_column]
    else:
        missing = [c for c in options.columns if c not in names]
        if missing:
            raise DataError(
                f"{source}: column(s) {', '.join(map(repr, missing))} not found; columns: "
                f"{', '.join(names)}"
            )
        if options.label_column in options.columns:
            raise ConfigError(
                f"columns: the label column {options.label_column!r} cannot also be a feature"
            )
        chosen = list(dict.fromkeys(options.columns))
    if not chosen:
        raise DataError(f"{source}: no feature columns (columns: {', '.join(names)})")
    non_numeric = []
    for name in chosen:
        column = table.column(name)
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
            continue  # a column with no value at all is numeric and wholly missing
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            count, first = _not_numbers(column)
            non_numeric.append(
                f"column {name!r}: {count} of {len(column)} values are not numbers "
                f"(first: {first!r})"
            )
        else:
            non_numeric.append(f"column {name!r}: type {kind}, not numbers")
    if non_numeric:
        raise DataError(
            f"{source}: non-numeric feature column(s): {_name_some(non_numeric)}; choose "
            f"numeric columns with --columns"
        )
    return chosen


def _table_labels(source: str, column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, dict]:
    """Class indices (N,) int64 from a label column (nulls become -1), plus what to record:
    integer labels as they are, text labels numbered in sorted order (`classes`)."""
    kind = column.type
    if pa.types.is_integer(kind):
        values = pc.fill_null(column, -1).to_numpy().astype(np.int64)
        if (values[column.is_valid().to_numpy(zero_copy_only=False)] < 0).any():
            raise DataError(
                f"{source}: label column {name!r} holds negative labels; expected class "
                f"indices >= 0 or class names"
            )
        return values, {}
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        classes = sorted(set(v for v in column.to_pylist() if v is not None))
        index = {c: i for i, c in enumerate(classes)}
        values = np.array([index.get(v, -1) for v in column.to_pylist()], dtype=np.int64)
        return values, {"classes": classes}
    if pa.types.is_floating(kind):  # integer labels with missing ones read as NaN
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        return _class_indices(f"{source}: label column {name!r}", values), {}
    raise DataError(
        f"{source}: label column {name!r} has type {kind}; expected integer class indices "
        f"or class names"
    )


def _vectors(
    source: str,
    table: pa.Table,
    options: TableOptions,
    origin: dict,
    labels: np.ndarray | None = None,
) -> LoadedImages:
    """Numeric feature columns of `table` as float32 (N, D), checked for missing values.

    `labels` are given by sources that keep them apart from the table (npz 'y', scikit-learn
    bunches); otherwise `options.label_column` names them. A missing (null / NaN) or infinite
    feature, or a missing label, fails naming each column and its count, unless
    `options.drop_missing` drops those rows (the count is recorded).
    """
    if table.num_rows == 0:
        raise DataError(f"{source}: holds no rows")
    names = table.column_names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(
            f"{source}: column name(s) {_name_some([repr(n) for n in repeated])} appear more "
            f"than once; expected each column named once"
        )
    columns = _feature_columns(source, table, options)
    x = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    faults, bad_rows = [], np.zeros(table.num_rows, dtype=bool)
    for j, name in enumerate(columns):
        values = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        x[:, j] = values  # nulls arrive as NaN; values beyond float32 become infinite here
        missing, infinite = np.isnan(x[:, j]), np.isinf(x[:, j])
        if missing.any() or infinite.any():
            faults.append(
                f"column {name!r}: {int(missing.sum())} missing (null or NaN) and "
                f"{int(infinite.sum())} infinite value(s)"
            )
            bad_rows |= missing | infinite
    recorded: dict[str, Any] = {}
    if options.label_column is not None:
        labels, recorded = _table_labels(
            source, table.column(options.label_column), options.label_column
        )
    if labels is not None and (unlabelled := labels == NO_CLASS).any():
        where = "array 'y'" if options.label_column is None else f"column {options.label_column!r}"
        faults.append(f"label {where}: {int(unlabelled.sum())} missing value(s)")
        bad_rows |= unlabelled
    if faults and not options.drop_missing:
        raise DataError(
            f"{source}: {_name_some(faults)}; fix the data or pass --drop-missing to drop "
            f"those rows"
        )
    if bad_rows.all():
        raise DataError(f"{source}: every one of {len(x)} rows has a missing or infinite value")
    keep = ~bad_rows
    return LoadedImages(
        pool=Split(x[keep], None if labels is None else labels[keep]),
        raw_max=1.0,
        origin={
            **origin,
            "columns": columns,
            "label_column": options.label_column,
            **recorded,
            "drop_missing": options.drop_missing,
            "dropped_rows": int(bad_rows.sum()),
        },
        default_test_fraction=0.2,
        feature_names=tuple(columns),
    )


def _load_csv(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """A CSV file with a header row: numeric feature columns and an optional label column."""
    path = _require_path("csv", path)
    _no_image_options("csv", image_size, channels)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        # Empty text cells are missing values, as empty numeric cells are.
        read = pyarrow.csv.read_csv(
            path, convert_options=pyarrow.csv.ConvertOptions(strings_can_be_null=True)
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    return _vectors(str(path), read, table, {"path": str(path.resolve())})


def _load_parquet(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """A Parquet file: numeric feature columns and an optional label column."""
    path = _require_path("parquet", path)
    _no_image_options("parquet", image_size, channels)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        read = pyarrow.parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    return _vectors(str(path), read, table, {"path": str(path.resolve())})


def _bundled_table(name: str, function: str) -> Loader:
    """A loader for one of scikit-learn's bundled tables (wine, breast cancer), read by
    `sklearn.datasets.<function>`."""

    def loader(
        path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
    ) -> LoadedImages:
        if path is not None:
            raise ConfigError(
                f"path: the {name} data set is bundled with scikit-learn and takes no path; "
                f"got {path}"
            )
        _no_image_options(name, image_size, channels)
        if table.label_column is not None:
            raise ConfigError(
                f"label_column: the {name} data set comes with its labels; "
                f"got label_column={table.label_column!r}"
            )
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, function)()
        columns = pa.table({f: bunch.data[:, j] for j, f in enumerate(bunch.feature_names)})
        origin = {"origin": f"sklearn.datasets.{function}"}
        return _vectors(name, columns, table, origin, bunch.target.astype(np.int64))

    return loader


def _no_image_options(name: str, image_size: int | None, channels: int | None) -> None:
    if image_size is not None or channels is not None:
        raise ConfigError(
            f"image_size / channels: {name} holds vectors, not images; got "
            f"image_size={image_size}, channels={channels}"
        )


# --- image folders (torchvision ImageFolder layout) --------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _open_image(file: Path) -> Image.Image:
    """Open one image file (PIL reads the header only), or raise DataError naming it."""
    try:
        return Image.open(file)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{file}: not an image PIL can read ({exc})") from exc


def _decode_image(file: Path, mode: str, size: int) -> np.ndarray:
    """Pixels of `file` in PIL `mode` ("L" or "RGB"), resized to size x size, as uint8."""
    with _open_image(file) as image:
        try:
            image = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: cannot decode the image ({exc})") from exc
    return np.asarray(image, dtype=np.uint8)


def _load_image_folder(
    path: Path | None, *, image_size: int | None, channels: int | None, table: TableOptions
) -> LoadedImages:
    """`<root>/<class>/<image>` (torchvision ImageFolder): grey or RGB, resized to a square."""
    root = _require_path("image-folder", path)
    _table_options_unused("image-folder images", table)
    size = 28 if image_size is None else image_size
    if size < 1:
        raise ConfigError(f"image_size: expected a positive number of pixels; got {size}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels: expected 1 (grey) or 3 (RGB); got {channels}")
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder; expected the ImageFolder layout <root>/<class>/<image>"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root}: no class folders; expected the ImageFolder layout <root>/<class>/<image>"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            f
            for f in (root / name).rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise DataError(
                f"{root / name}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files += found
        labels += [label] * len(found)
    if channels is None:  # grey only if every image is grey; one colour image makes it RGB
        modes = set()
        for file in files:
            with _open_image(file) as image:
                modes.add(image.mode)
        channels = 1 if modes <= _GREY_MODES else 3
    pixels = np.stack([_decode_image(f, "L" if channels == 1 else "RGB", size) for f in files])
    x = pixels[:, None] if channels == 1 else pixels.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return LoadedImages(
        pool=Split(x.astype(np.float32) / np.float32(255.0), np.asarray(labels, dtype=np.int64)),
        raw_max=255.0,
        origin={"path": str(root.resolve()), "classes": classes, "image_size": size},
        default_test_fraction=0.2,
    )


DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist-idx": _load_mnist_idx,
    "npz": _load_npz,
    "image-folder": _load_image_folder,
    "csv": _load_csv,
    "parquet": _load_parquet,
    "wine": _bundled_table("wine", "load_wine"),
    "breast-cancer": _bundled_table("breast-cancer", "load_breast_cancer"),
}


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):  # also rejects NaN
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{name}: expected a fraction in {interval}; got {value}")


def _take(split: Split, index: np.ndarray) -> Split:
    x = split.x.take(index) if isinstance(split.x, MappedImages) else split.x[index]
    return Split(x, None if split.y is None else split.y[index])


def _shuffled_prefix(split: Split, count: int, rng: np.random.Generator) -> Split:
    """The first `count` examples of a seeded shuffle, kept in their original order."""
    return _take(split, np.sort(rng.permutation(len(split))[:count]))


def _limited(
    pool: Split, official_test: Split | None, limit: int, seed: int
) -> tuple[Split, Split | None]:
    """At most `limit` examples in all; an official test set keeps its share of them."""
    total = len(pool) + (0 if official_test is None else len(official_test))
    if limit >= total:
        return pool, official_test
    rng = np.random.default_rng(seed)
    pool_share = round(limit * len(pool) / total)
    if official_test is not None:
        official_test = _shuffled_prefix(official_test, limit - pool_share, rng)
    return _shuffled_prefix(pool, pool_share, rng), official_test


def _stratifiable(y: np.ndarray | None, n_held_out: int) -> bool:
    """A stratified cut needs >= 2 examples per class and room for every class on each side."""
    if y is None:
        return False
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return bool(counts.min() >= 2 and min(n_held_out, len(y) - n_held_out) >= len(counts))


def _hold_out(split: Split, fraction: float, seed: int, part: str) -> tuple[Split, Split, bool]:
    """Cut `fraction` of `split` off (rounded up) as `part`, stratified by label when possible.

    Returns (kept, held out, stratified). Too few examples to stratify (tiny `limit`s) fall back
    to a plain seeded shuffle, which `Dataset.source["stratified"]` records.
    """
    n_held_out = math.ceil(fraction * len(split))
    if len(split) - n_held_out < 1:
        raise ConfigError(
            f"{part}_fraction: {len(split)} example(s) are too few to hold out "
            f"{fraction} as {part} and keep some for training"
        )
    index = np.arange(len(split))
    if n_held_out == 0:
        return split, _take(split, index[:0]), False
    stratified = _stratifiable(split.y, n_held_out)
    from sklearn.model_selection import train_test_split

    kept, held_out = train_test_split(
        index, test_size=n_held_out, random_state=seed, stratify=split.y if stratified else None
    )
    return _take(split, np.sort(kept)), _take(split, np.sort(held_out)), stratified


def load_dataset(
    name: str,
    path: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float | None = None,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    limit: int | None = None,
    channels: int | None = None,
    columns: list[str] | tuple[str, ...] | None = None,
    label_column: str | None = None,
    drop_missing: bool = False,
) -> Dataset:
    """Load data set `name` (a key of `DATASETS`) and cut its seeded train / val / test split.

    `test_fraction=None` uses the data set's own test set when its files define one (MNIST's
    t10k next to train), else its default fraction (digits 0.3, others 0.2); an explicit
    fraction re-splits all the data. `val_fraction` is taken from what remains after the test
    part. `limit` keeps the first N examples of a seeded shuffle (for quick runs).
    `image_size` and `channels` apply to image-folder (resize, grey or RGB); `columns`,
    `label_column` and `drop_missing` to tables of features (`TableOptions`), which come back
    standardised with statistics fitted on the training split (`Dataset.standardizer`).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid data sets: {', '.join(DATASETS)}")
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction, allow_zero=False)
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: expected a positive number of examples; got {limit}")
    table = TableOptions(
        None if columns is None else tuple(columns), label_column, bool(drop_missing)
    )
    loaded = DATASETS[name](
        None if path is None else Path(path),
        image_size=image_size,
        channels=channels,
        table=table,
    )
    return cut_dataset(
        name,
        loaded,
        seed=seed,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        limit=limit,
    )


def cut_dataset(
    name: str,
    loaded: LoadedImages,
    *,
    seed: int,
    test_fraction: float | None,
    val_fraction: float,
    limit: int | None,
) -> Dataset:
    """The seeded train / val / test cut of `load_dataset`, on what a loader read.

    Only the labels decide the cut, and rows are only indexed, never changed: an `x` of row
    positions (`aet embed` plans a job this way without reading pixels) comes back cut the same
    way as the images would.
    """
    pool, official_test = loaded.pool, loaded.official_test
    if official_test is not None and test_fraction is not None:
        pool, official_test = _concat(pool, official_test), None
    everything = pool if official_test is None else _concat(pool, official_test)
    num_classes = None if everything.y is None else int(everything.y.max()) + 1
    if limit is not None:
        pool, official_test = _limited(pool, official_test, limit, seed)

    if official_test is None:
        test_fraction = loaded.default_test_fraction if test_fraction is None else test_fraction
        fit, test, test_stratified = _hold_out(pool, test_fraction, seed, "test")
    else:
        fit, test, test_stratified = pool, official_test, False
    train, val, val_stratified = _hold_out(fit, val_fraction, seed, "val")

    source = {
        "name": name,
        **loaded.origin,
        "seed": seed,
        "test_fraction": "official" if official_test is not None else test_fraction,
        "val_fraction": val_fraction,
        "limit": limit,
        "stratified": {"test": test_stratified, "val": val_stratified},
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
    }
    standardizer = None
    if loaded.feature_names is not None:
        standardizer = FeatureStandardizer.fit(np.asarray(train.x))  # vectors: in memory
        train, val, test = (
            Split(standardizer.transform(np.asarray(s.x)), s.y) for s in (train, val, test)
        )
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=test,
        raw_max=loaded.raw_max,
        image_shape=tuple(int(d) for d in pool.x.shape[1:]),
        num_classes=num_classes,
        source=source,
        feature_names=loaded.feature_names,
        standardizer=standardizer,
    )
