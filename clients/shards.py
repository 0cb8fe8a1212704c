"""Resumable extraction jobs: `ShardStore` (`<output>.shards/`, in process) and `PartsFolder`
(a `--ray` output folder written by the workers); each knows which rows are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from aet.clients.embeddings import MANIFEST, ExtractionError, atomic_write
from aet.runtime import Outputs

log = logging.getLogger(__name__)


class JobFolder:
    """A folder holding one job's finished blocks of `shard_size` rows, and a manifest naming
    the job: a restarted job must match it to reuse them."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = json.loads(json.dumps(manifest))  # as read back: tuples become lists
        self.rows = manifest["rows"]
        self.block_rows = manifest["shard_size"]

    @property
    def count(self) -> int:
        return -(-self.rows // self.block_rows)

    def bounds(self, index: int) -> tuple[int, int]:
        """First and one-past-last row of block `index`."""
        return index * self.block_rows, min((index + 1) * self.block_rows, self.rows)

    def previous_manifest(self) -> dict[str, Any] | None:
        """The manifest already in the folder, or None."""
        path = self.folder / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ExtractionError(
                f"{path}: unreadable manifest ({exc}); delete {self.folder} to start afresh"
            ) from exc

    def check_same_job(self, previous: dict[str, Any]) -> None:
        """Refuse an unfinished job of other arguments, naming the first field that differs."""
        for key, value in self.manifest.items():
            if previous.get(key) != value:
                raise ExtractionError(
                    f"{self.folder / MANIFEST}: field {key!r}: this job has {value!r}, the "
                    f"unfinished one has {previous.get(key)!r}; finish it with the same "
                    f"arguments or delete {self.folder}"
                )


class ShardStore(JobFolder):
    """`<output>.shards/`: a manifest naming the job, and one `.npz` per finished shard.

    A shard counts as finished only if it loads and holds the expected ids, a finite
    float32 array of each output (`shapes`: name -> shape of one row) and the digest of the
    input rows it was made from (`input_digest`) equal to that of the rows read now; anything
    else is deleted and embedded again, so a data file changed under an unfinished job never
    lends it stale rows.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
        super().__init__(folder, manifest)
        self.shapes = shapes
        self.stale: list[int] = []  # shards whose input rows changed since they were written

    def open(self) -> None:
        """Create the folder, or check that the job it holds is this one."""
        previous = self.previous_manifest()
        if previous is not None:
            self.check_same_job(previous)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = json.dumps(self.manifest, indent=2)
        atomic_write(self.folder / MANIFEST, lambda t: t.write_text(manifest))

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.npz"

    def is_finished(self, index: int, digest: str) -> bool:
        """Whether shard `index` is a valid finished shard made from input rows of `digest`
        (an invalid or stale file is removed)."""
        path = self.path(index)
        if not path.exists():
            return False
        start, stop = self.bounds(index)
        try:
            with np.load(path, allow_pickle=False) as archive:
                ids = archive["ids"]
                outputs = {name: archive[name] for name in self.shapes}
                made_from = str(archive[DIGEST_KEY])
            valid = np.array_equal(ids, np.arange(start, stop)) and all(
                array.dtype == np.float32
                and array.shape == (stop - start, *self.shapes[name])
                and bool(np.isfinite(array).all())
                for name, array in outputs.items()
            )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            valid = False
        if valid and made_from != digest:
            self.stale.append(index)
            valid = False
        if not valid:
            path.unlink()
        return valid

    def read(self, index: int, name: str) -> np.ndarray:
        """One output (`name`) of finished shard `index`, read from its file."""
        path = self.path(index)
        try:
            with np.load(path, allow_pickle=False) as archive:
                return archive[name]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise ExtractionError(
                f"{path}: unreadable shard ({exc}); run the same command again to embed its "
                f"rows again"
            ) from exc

    def save(self, index: int, outputs: Outputs, digest: str) -> None:
        """Write shard `index`, made from input rows of `digest`, atomically."""
        start, stop = self.bounds(index)
        ids = np.arange(start, stop, dtype=np.int64)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                arrays: dict[str, Any] = {"ids": ids, **outputs, DIGEST_KEY: np.str_(digest)}
                np.savez(handle, **arrays)

        atomic_write(self.path(index), write)

    def remove(self) -> None:
        shutil.rmtree(self.folder)


DIGEST_KEY = "input_digest"  # the shard array holding the sha256 of its input rows


def input_digest(rows: np.ndarray) -> str:
    """sha256 of a block of input rows (dtype, shape and bytes): what a shard was made from."""
    digest = hashlib.sha256(f"{rows.dtype.str}{rows.shape}".encode())
    digest.update(np.ascontiguousarray(rows).data)
    return digest.hexdigest()


class PartsFolder(JobFolder):
    """A `--ray` output: a folder of Parquet files written by the workers, and `manifest.json`.

    The manifest names the job and says whether it is complete. Rows carry their block
    (`id // shard_size`); a block is finished when all its rows are in readable files. A file
    holding rows of an unfinished block is deleted (its other blocks are embedded again), so
    that no row is written twice.
    """

    def open(self, overwrite: bool) -> None:
        """Create the folder, empty a finished one (`overwrite`), or check an unfinished one."""
        if self.folder.exists() and not self.folder.is_dir():
            if not overwrite:
                raise ExtractionError(f"{self.folder}: already exists; pass --overwrite")
            self.folder.unlink()
        previous = self.previous_manifest()
        if previous is not None:
            if previous.get("complete") and overwrite:
                shutil.rmtree(self.folder)
            else:
                self.check_same_job(previous)
                return
        elif self.folder.is_dir() and any(self.folder.iterdir()):
            raise ExtractionError(
                f"{self.folder}: a folder without {MANIFEST}, not an aet embed output; "
                f"refusing to write into it"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_manifest({**self.manifest, "complete": False})

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.folder / MANIFEST, lambda t: t.write_text(json.dumps(manifest, indent=2)))

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.parquet"))

    def pending_blocks(self) -> list[int]:
        """The blocks still to embed; files that hold rows of any of them are deleted."""
        import pyarrow.parquet as pq

        expected = np.array([stop - start for start, stop in map(self.bounds, range(self.count))])
        counts: dict[Path, np.ndarray] = {}
        for path in self.files():
            try:
                ids = pq.read_table(path, columns=["id"]).column("id").to_numpy()
                counts[path] = np.bincount(ids // self.block_rows, minlength=self.count)
            except (OSError, ValueError, KeyError) as exc:  # a file cut short by a crash
                log.warning("%s: unreadable (%s); its rows are embedded again", path, exc)
                path.unlink()
        while True:
            total = sum(counts.values(), np.zeros(self.count, np.int64))
            finished = total == expected
            spoiled = [path for path, c in counts.items() if (c[~finished] > 0).any()]
            if not spoiled:
                return [int(i) for i in np.flatnonzero(~finished)]
            for path in spoiled:
                path.unlink()
                del counts[path]

    def finish(self, metadata: dict[str, Any]) -> None:
        """Check that the files hold every row, then mark the job complete."""
        import pyarrow.parquet as pq

        written = sum(pq.read_metadata(path).num_rows for path in self.files())
        if written != self.rows:
            raise ExtractionError(
                f"{self.folder}: expected {self.rows} rows in its Parquet files, found "
                f"{written}; run the same command again to resume"
            )
        self._write_manifest({**self.manifest, "complete": True, "metadata": metadata})
