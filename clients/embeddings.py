"""The output of `aet embed`: one row per example (id, split, label, embedding and, with
`--score`, the novelty score and, for a calibrated model, its conformal p-value) as `.npz`
(arrays + JSON metadata), `.parquet` (columns + schema metadata), or, from Ray, a folder of
Parquet files with a manifest; written atomically.
"""

from __future__ import annotations

import itertools
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aet.conformal import P_VALUE_NAME
from aet.errors import UserError
from aet.files import atomic_write
from aet.repository import SCORE_NAME

FORMATS = (".npz", ".parquet")
MANIFEST = "manifest.json"
OPTIONAL_FIELDS = {  # field -> array / column, written when the table has it
    "scores": SCORE_NAME,  # with --score
    "p_values": P_VALUE_NAME,  # with --score, for a model with calibration scores
}


class ExtractionError(UserError):
    """An extraction output, shard or manifest is unreadable or belongs to another job."""


@dataclass(frozen=True)
class EmbeddingTable:
    """An extraction output: one row per example, and the metadata that made it."""

    embeddings: np.ndarray  # (N, D) float32
    ids: np.ndarray  # (N,) int64: the row's position in train, val, test order
    labels: np.ndarray  # (N,) int64, NO_LABEL when unlabelled
    split: np.ndarray  # (N,) str
    metadata: dict  # dataset (load_dataset arguments), model, backend, created
    scores: np.ndarray | None = None  # (N,) float32 reconstruction_error, with --score
    p_values: np.ndarray | None = None  # (N,) float32 conformal p-values of `scores`

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and labels of one split ("train", "val", "test")."""
        mask = self.split == name
        return self.embeddings[mask], self.labels[mask]


@dataclass(frozen=True)
class TableParts:
    """An `EmbeddingTable` given block by block, to write one bigger than memory:
    `read(start, stop, field)` gives rows [start, stop) of one of its fields (`embeddings`,
    `ids`, `labels`, `split`, and those of `OPTIONAL_FIELDS` in `present`), read only when
    asked; `bounds` are the blocks in row order."""

    metadata: dict
    bounds: Sequence[tuple[int, int]]
    read: Callable[[int, int, str], np.ndarray]
    present: frozenset[str] = frozenset()  # its fields of `OPTIONAL_FIELDS`

    @classmethod
    def of(cls, table: EmbeddingTable) -> TableParts:
        """A table already in memory, as one block."""
        return cls(
            table.metadata,
            [(0, len(table.ids))],
            lambda start, stop, name: getattr(table, name)[start:stop],
            frozenset(field for field in OPTIONAL_FIELDS if getattr(table, field) is not None),
        )

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.bounds)

    def fields(self, names: dict[str, str]) -> dict[str, str]:
        """`names` (field -> its name in a file) less the optional fields it does not have."""
        return {
            field: name
            for field, name in names.items()
            if field not in OPTIONAL_FIELDS or field in self.present
        }

    def blocks(self, field: str) -> Iterator[np.ndarray]:
        """One field, block by block; `ValueError` for a block of the wrong length."""
        for start, stop in self.bounds:
            block = self.read(start, stop, field)
            if len(block) != stop - start:
                raise ValueError(f"{field}: expected {stop - start} rows, got {len(block)}")
            yield block


NPZ_ARRAYS = {  # field -> array of an .npz output (and "metadata", JSON)
    "embeddings": "embeddings",
    "ids": "ids",
    "labels": "labels",
    "split": "split",
    **OPTIONAL_FIELDS,
}
PARQUET_COLUMNS = {  # field -> column of a .parquet output (and the schema metadata "aet")
    "ids": "id",
    "split": "split",
    "labels": "label",
    "embeddings": "embedding",
    **OPTIONAL_FIELDS,
}


def write_embeddings(path: Path, table: EmbeddingTable | TableParts) -> None:
    """Write `table` atomically as `.npz` (arrays + JSON metadata) or `.parquet` (columns,
    one row group per block, + schema metadata), block by block: a `TableParts` is never
    held whole."""
    parts = table if isinstance(table, TableParts) else TableParts.of(table)
    write = _write_npz if path.suffix == ".npz" else _write_parquet
    atomic_write(path, lambda temporary: write(temporary, parts))


def _write_npz(temporary: Path, table: TableParts) -> None:
    """The arrays `np.savez` would write (uncompressed), each streamed block by block."""
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        for field, name in table.fields(NPZ_ARRAYS).items():
            blocks = (_as_written(field, block) for block in table.blocks(field))
            first = next(blocks)
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(first.dtype),
                    "fortran_order": False,
                    "shape": (table.rows, *first.shape[1:]),
                }
                np.lib.format.write_array_header_1_0(member, header)
                for block in itertools.chain([first], blocks):
                    if block.dtype != first.dtype or block.shape[1:] != first.shape[1:]:
                        raise ValueError(
                            f"{field}: expected blocks of {first.dtype} {first.shape[1:]}, "
                            f"got {block.dtype} {block.shape[1:]}"
                        )
                    member.write(block.data)
        with archive.open("metadata.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.array(json.dumps(table.metadata)))


def _write_parquet(temporary: Path, table: TableParts) -> None:
    """One row group per block, the metadata in the schema as "aet"."""
    import pyarrow.parquet as pq

    blocks = _arrow_blocks(table)
    first = next(blocks)
    schema = first.schema.with_metadata({"aet": json.dumps(table.metadata)})
    with pq.ParquetWriter(temporary, schema) as writer:
        for arrow in itertools.chain([first], blocks):
            writer.write_table(arrow)


def _arrow_blocks(table: TableParts) -> Iterator[Any]:
    """The Parquet columns of each block, as Arrow tables."""
    import pyarrow as pa

    fields = table.fields(PARQUET_COLUMNS)
    for block in zip(*(table.blocks(field) for field in fields), strict=True):
        columns = {}
        for field, values in zip(fields, block, strict=True):
            values = _as_written(field, values)
            columns[fields[field]] = (
                pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
                if field == "embeddings"
                else pa.array(values)
            )
        yield pa.table(columns)


def _as_written(field: str, block: np.ndarray) -> np.ndarray:
    """A block as a file holds it: C-contiguous, split names as str."""
    return np.ascontiguousarray(block.astype(str) if field == "split" else block)


def _arrow_table(path: Path, arrow, metadata: dict) -> EmbeddingTable:
    """The columns of an Arrow table of embeddings (id, split, label, embedding and, with
    --score, reconstruction_error and p_value)."""
    import pyarrow as pa

    embedding = arrow.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(embedding.type):
        raise ExtractionError(
            f"{path}: column 'embedding': expected fixed-size lists, got {embedding.type}"
        )
    flat = embedding.flatten().to_numpy(zero_copy_only=False)
    return EmbeddingTable(
        flat.reshape(len(arrow), embedding.type.list_size),
        arrow.column("id").to_numpy(),
        arrow.column("label").to_numpy(),
        arrow.column("split").to_numpy(zero_copy_only=False).astype(str),
        metadata,
        **{
            field: arrow.column(name).to_numpy() if name in arrow.column_names else None
            for field, name in OPTIONAL_FIELDS.items()
        },
    )


def _read_parts(folder: Path) -> EmbeddingTable:
    """A `--ray` output folder, rows sorted by id; it must be complete and hold each row once."""
    import pyarrow.parquet as pq

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ExtractionError(f"{folder}: no readable {MANIFEST}; not an aet embed output") from exc
    if not manifest.get("complete"):
        raise ExtractionError(
            f"{folder}: an unfinished job; run the same aet embed command again to finish it"
        )
    files = sorted(folder.glob("*.parquet"))
    try:
        arrow = pq.ParquetDataset(files).read() if files else None
    except (OSError, ValueError) as exc:
        raise ExtractionError(f"{folder}: unreadable Parquet files ({exc})") from exc
    found = 0 if arrow is None else len(arrow)
    if arrow is None or found != manifest["rows"]:
        raise ExtractionError(f"{folder}: expected {manifest['rows']} rows, found {found}")
    arrow = arrow.sort_by("id")
    table = _arrow_table(folder, arrow, manifest["metadata"])
    if not np.array_equal(table.ids, np.arange(manifest["rows"])):
        raise ExtractionError(f"{folder}: row ids are not 0..{manifest['rows'] - 1}, each once")
    return table


def read_embeddings(path: str | os.PathLike) -> EmbeddingTable:
    """Read an `aet embed` output (`.npz` or `.parquet`); errors name the file and the fault."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ExtractionError(
            f"{path}: expected an aet embed output ending in {' or '.join(FORMATS)}"
        )
    if path.is_dir():
        return _read_parts(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                missing = {"embeddings", "ids", "labels", "split", "metadata"} - set(archive.files)
                if missing:
                    raise ExtractionError(
                        f"{path}: missing arrays {sorted(missing)}; found {archive.files}"
                    )
                table = EmbeddingTable(
                    archive["embeddings"],
                    archive["ids"],
                    archive["labels"],
                    archive["split"],
                    json.loads(str(archive["metadata"])),
                    **{
                        field: archive[name] if name in archive.files else None
                        for field, name in OPTIONAL_FIELDS.items()
                    },
                )
        else:
            import pyarrow.parquet as pq

            arrow = pq.read_table(path)
            metadata = (arrow.schema.metadata or {}).get(b"aet")
            if metadata is None:
                raise ExtractionError(f"{path}: no 'aet' schema metadata; not an aet embed output")
            table = _arrow_table(path, arrow, json.loads(metadata))
    except FileNotFoundError:
        raise ExtractionError(f"{path}: no such file; run aet embed first") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ExtractionError(f"{path}: not a readable aet embed output ({exc})") from exc
    rows = len(table.ids)
    if table.embeddings.ndim != 2 or any(
        len(a) != rows for a in (table.embeddings, table.labels, table.split)
    ):
        raise ExtractionError(
            f"{path}: columns differ in length or shape: embeddings "
            f"{table.embeddings.shape}, ids {rows}, labels {len(table.labels)}, "
            f"split {len(table.split)}"
        )
    return table
