"""The output of `aet embed`: one row per example (id, split, label, embedding and, with
`--score`, the novelty score) as `.npz` (arrays + JSON metadata), `.parquet` (columns + schema
metadata), or, from Ray, a folder of Parquet files with a manifest; written atomically.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aet.errors import UserError
from aet.files import atomic_write

FORMATS = (".npz", ".parquet")
MANIFEST = "manifest.json"
SCORE_COLUMN = "reconstruction_error"  # the novelty score's array / column, with --score


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

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and labels of one split ("train", "val", "test")."""
        mask = self.split == name
        return self.embeddings[mask], self.labels[mask]


def write_embeddings(path: Path, table: EmbeddingTable) -> None:
    """Write `table` atomically as `.npz` (arrays + JSON metadata) or `.parquet`."""
    if path.suffix == ".npz":

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                arrays: dict[str, Any] = {
                    "embeddings": table.embeddings,
                    "ids": table.ids,
                    "labels": table.labels,
                    "split": table.split.astype(str),
                    "metadata": np.array(json.dumps(table.metadata)),
                }
                if table.scores is not None:
                    arrays[SCORE_COLUMN] = table.scores
                np.savez(handle, **arrays)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = table.embeddings.shape[1]
        columns = {
            "id": pa.array(table.ids),
            "split": pa.array(table.split.astype(str)),
            "label": pa.array(table.labels),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(table.embeddings.reshape(-1)), dim
            ),
        }
        if table.scores is not None:
            columns[SCORE_COLUMN] = pa.array(table.scores)
        arrow = pa.table(columns).replace_schema_metadata({"aet": json.dumps(table.metadata)})

        def write(temporary: Path) -> None:
            pq.write_table(arrow, temporary)

    atomic_write(path, write)


def _arrow_table(path: Path, arrow, metadata: dict) -> EmbeddingTable:
    """The columns of an Arrow table of embeddings (id, split, label, embedding and, with
    --score, reconstruction_error)."""
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
        arrow.column(SCORE_COLUMN).to_numpy() if SCORE_COLUMN in arrow.column_names else None,
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
                    archive[SCORE_COLUMN] if SCORE_COLUMN in archive.files else None,
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
