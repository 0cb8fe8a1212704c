"""Images left on disk: rows of a memory-mapped file, read and scaled only when indexed.

Uncompressed MNIST-format IDX files and `.npz` archives whose `x` is stored (not deflated) are
mapped rather than read, so a training set need not fit in memory: the training loop gathers
one batch of rows at a time (`MappedImages[rows]`), and the seeded train / val / test cut only
keeps row positions. Anything that needs the pixels as one array (a pixel baseline, a PCA fit)
calls `np.asarray` and holds just the rows it asked for.
"""

from __future__ import annotations

import math
import mmap
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_ROWS = 65_536  # rows per read when a whole mapped array is checked
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True, eq=False)
class MappedImages:
    """Rows `rows` of the array (N, C, H, W) of dtype `raw_dtype` at byte `offset` of `path`,
    read as float32 in [0, 1] (raw value / `scale`).

    Each read maps the file for its own duration, so pixels read once do not stay resident in
    this process; pickled, it is the file reference and the row positions (DataLoader workers
    and other processes read the file themselves, not a copy of the pixels).
    """

    path: str
    offset: int
    raw_dtype: np.dtype
    raw_shape: tuple[int, ...]  # the whole file's array, (N, C, H, W)
    rows: np.ndarray  # (n,) int64 positions into the file's array
    scale: float  # the raw value that maps to 1.0

    dtype = np.dtype(np.float32)

    @classmethod
    def whole(
        cls, path: Path, offset: int, raw_dtype: np.dtype, raw_shape: tuple[int, ...], scale: float
    ) -> MappedImages:
        """Every row of the array at `offset` of `path`."""
        rows = np.arange(raw_shape[0])
        return cls(str(path), offset, np.dtype(raw_dtype), raw_shape, rows, scale)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.raw_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.raw_shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def same_file(self, other: object) -> bool:
        """True when `other` maps the same array of the same file (its rows may differ)."""
        return isinstance(other, MappedImages) and (other.path, other.offset) == (
            self.path,
            self.offset,
        )

    def take(self, index: np.ndarray) -> MappedImages:
        """The rows at `index` of these rows, still on disk."""
        return replace(self, rows=self.rows[index])

    def joined(self, other: MappedImages) -> MappedImages:
        """These rows followed by `other`'s, which must map the same file."""
        assert self.same_file(other)
        return replace(self, rows=np.concatenate([self.rows, other.rows]))

    def __getitem__(self, index: Any) -> np.ndarray:
        """The indexed rows read from disk as float32 in [0, 1], numpy's indexing rules: the
        first index picks rows (an int gives one image), any further ones index within them."""
        rows, within = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        positions = self.rows[rows]
        if within:
            within = within if np.ndim(positions) == 0 else (slice(None), *within)
        # Mapped for this read only: the pages leave this process's RSS when it ends.
        with (
            open(self.path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        ):
            count = math.prod(self.raw_shape)
            whole = np.frombuffer(mapped, self.raw_dtype, count, self.offset)
            pixels = np.array(whole.reshape(self.raw_shape)[positions][within], dtype=np.float32)
            del whole  # no view may outlive the mapping
        if self.scale != 1.0:
            pixels /= np.float32(self.scale)
        return pixels

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        pixels = self[:]
        return pixels if dtype is None else pixels.astype(dtype)

    def reshape(self, *shape: int) -> np.ndarray:
        """All rows read into memory, reshaped."""
        return self[:].reshape(*shape)


def stored_npz_member(path: Path, name: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
    """(offset, dtype, shape) of array `name` inside the `.npz` archive `path` when it can be
    mapped: stored without compression, in C order. None otherwise (it is then read)."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the zip local file header, then its name and extra field
        if local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
        start += int.from_bytes(local[28:30], "little")
        handle.seek(start)
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_READERS:
            return None
        shape, fortran_order, dtype = _HEADER_READERS[version](handle)
        if fortran_order or dtype.hasobject:
            return None
        return handle.tell(), dtype, tuple(int(d) for d in shape)


Images = np.ndarray | MappedImages  # float32 images (N, C, H, W) in [0, 1], in memory or on disk
