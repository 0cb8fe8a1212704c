"""No traceback for a user error, as a property of every command: a catalogue of bad inputs
(issue 24 and docs/FAULTS.md) fed to `aet.cli.main` in process, each answered with exit 2, one
line on stderr naming the problem, and no new file that a later run would trust (an output,
a shard, a checkpoint, a model version)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DIGITS_MODEL
from kserve_harness import ROW_SHAPE, encoder_onnx

from aet.cli import main
from aet.repository import InputSpec, ModelCard, OutputSpec, write_version

TRUSTED_SUFFIXES = {".pt", ".npz", ".parquet", ".onnx"}
TRUSTED_NAMES = {"model.json", "manifest.json"}
TINY_PRETRAIN = ["--epochs", "1", "--hidden-sizes", "8", "--code-size", "2", "--no-progress"]


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def trusted(paths: set[Path]) -> list[Path]:
    """Files a later run would read as finished work (hidden temporary files are not)."""
    return sorted(
        p
        for p in paths
        if not p.name.startswith(".") and (p.suffix in TRUSTED_SUFFIXES or p.name in TRUSTED_NAMES)
    )


def disk_full(monkeypatch) -> None:
    """Every fsync fails as on a full disk (the writers fsync before they rename)."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def renamed_input_model(root: Path) -> Path:
    """A version whose card names input 'image' while its graph's input is 'pixels'."""
    card = ModelCard.draft(
        "renamed",
        "linear",
        InputSpec("image", ROW_SHAPE, "float32", (0.0, 16.0)),
        OutputSpec("embedding", "float32", 4),
        dataset={"name": "digits"},
    )
    return write_version(root, "renamed", encoder_onnx(1), card)


def one_class_csv(tmp: Path) -> Path:
    """Six features (as `vector_model` takes) and a label column holding one class, 7."""
    rows = [",".join(str(i * k) for k in range(1, 7)) + ",7" for i in range(40)]
    return write_csv(tmp / "one.csv", "a,b,c,d,e,f,label", rows)


def nan_label_parquet(tmp: Path) -> Path:
    labels = np.arange(40) % 2 * 1.0
    labels[::7] = np.nan  # 6 missing labels
    table = pa.table({"a": np.arange(40.0), "b": np.arange(40.0) * 3, "label": labels})
    pq.write_table(table, tmp / "nan.parquet")
    return tmp / "nan.parquet"


def empty_npz(tmp: Path) -> Path:
    np.savez(tmp / "empty.npz", x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
    return tmp / "empty.npz"


# (id, argv builder (tmp, digits model folder, vectors model folder) -> argv, the expected
#  fragment of the one line, whether the disk is full)
CATALOGUE = [
    (
        "embed: ONNX input name differs from the card",
        lambda t, m, v: [
            "embed",
            "--local",
            str(renamed_input_model(t / "exported")),
            "--output",
            str(t / "out.npz"),
            "--limit",
            "50",
        ],
        "input: expected 'image' (model card), got ['pixels']",
        False,
    ),
    (
        "pretrain: csv with a duplicate column name",
        lambda t, m, v: [
            "pretrain",
            "--dataset",
            "csv",
            "--data-path",
            str(write_csv(t / "dup.csv", "a,a,b", ["1,2,3"] * 20)),
            "--runs-dir",
            str(t / "runs"),
            *TINY_PRETRAIN,
        ],
        "column name(s) 'a' appear more than once",
        False,
    ),
    (
        "pretrain: 0-row npz",
        lambda t, m, v: [
            "pretrain",
            "--dataset",
            "npz",
            "--data-path",
            str(empty_npz(t)),
            "--runs-dir",
            str(t / "runs"),
            *TINY_PRETRAIN,
        ],
        "array 'x' holds no rows (shape (0, 8, 8))",
        False,
    ),
    (
        "embed: 0-row npz",
        lambda t, m, v: [
            "embed",
            "--local",
            str(m),
            "--dataset",
            "npz",
            "--data-path",
            str(empty_npz(t)),
            "--output",
            str(t / "out.npz"),
        ],
        "array 'x' holds no rows",
        False,
    ),
    (
        "pretrain: a label column of one class, refused before training",
        lambda t, m, v: [
            "pretrain",
            "--dataset",
            "csv",
            "--data-path",
            str(one_class_csv(t)),
            "--label-column",
            "label",
            "--runs-dir",
            str(t / "runs"),
            *TINY_PRETRAIN,
        ],
        "hold one class (7); the evaluation's probes: at least two needed",
        False,
    ),
    (
        "pretrain: NaN labels are named with their count",
        lambda t, m, v: [
            "pretrain",
            "--dataset",
            "parquet",
            "--data-path",
            str(nan_label_parquet(t)),
            "--label-column",
            "label",
            "--runs-dir",
            str(t / "runs"),
            *TINY_PRETRAIN,
        ],
        "label column 'label': 6 missing value(s); fix the data or pass --drop-missing",
        False,
    ),
    (
        "pretrain: full disk",
        lambda t, m, v: [
            "pretrain",
            "--limit",
            "120",
            "--runs-dir",
            str(t / "runs"),
            *TINY_PRETRAIN,
        ],
        "No space left on device",
        True,
    ),
    (
        "embed: full disk",
        lambda t, m, v: [
            "embed",
            "--local",
            str(m),
            "--limit",
            "50",
            "--output",
            str(t / "out.npz"),
            "--no-progress",
        ],
        "No space left on device",
        True,
    ),
    (
        "export: a checkpoint that is not there",
        lambda t, m, v: [
            "export",
            "--checkpoint",
            str(t / "absent.pt"),
            "--model",
            "m",
            "--repository",
            str(t / "exported"),
        ],
        "absent.pt: no such file",
        False,
    ),
    (
        "predict: an encoder is not a classifier",
        lambda t, m, v: [
            "predict",
            "--local",
            str(m),
            "--limit",
            "50",
            "--output",
            str(t / "p.parquet"),
        ],
        "classifier",
        False,
    ),
    (
        "probe: embeddings file that is not there",
        lambda t, m, v: ["probe", "--embeddings", str(t / "absent.npz")],
        "absent.npz",
        False,
    ),
    (
        "head: a label column of one class",
        lambda t, m, v: [
            "head",
            "--model",
            str(v),
            "--name",
            "h",
            "--dataset",
            "csv",
            "--data-path",
            str(one_class_csv(t)),
            "--label-column",
            "label",
            "--repository",
            str(t / "exported"),
        ],
        "hold one class (7); a classifier: at least two needed",
        False,
    ),
    (
        "serve: a repository that is not there",
        lambda t, m, v: ["serve", "--repository", str(t / "absent"), "--port", "0"],
        "absent",
        False,
    ),
]


@pytest.mark.parametrize(
    "build, fragment, full_disk", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_a_user_error_is_one_line_and_exit_2(
    tmp_path, model_repository, vector_model, monkeypatch, capsys, build, fragment, full_disk
):
    argv = build(tmp_path, model_repository / DIGITS_MODEL, vector_model.parent)
    before = files_under(tmp_path)
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, extracted/) land here too
    if full_disk:
        disk_full(monkeypatch)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"aet {argv[0]}: error: ") and fragment in lines[0], err
    assert trusted(files_under(tmp_path) - before) == []
