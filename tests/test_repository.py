"""The model repository: card schema, sha256, version numbering and atomic writes."""

import dataclasses
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aet import repository
from aet.repository import (
    InputSpec,
    ModelCard,
    OutputSpec,
    RepositoryError,
    latest_version,
    next_version,
    read_model_card,
    scan_repository,
    write_version,
)


def make_card(name: str = "digits") -> ModelCard:
    return ModelCard(
        name=name,
        version=1,
        architecture="mlp",
        hyperparameters={"hidden_sizes": [32], "code_size": 8},
        input=InputSpec(name="pixels", shape=(1, 8, 8), dtype="float32", value_range=(0.0, 16.0)),
        output=OutputSpec(name="embedding", dtype="float32", embedding_dim=8),
        preprocessing=["scale: x / 16", "flatten: (1, 8, 8) -> 64"],
        dataset={"name": "digits", "split": "test"},
        metrics={"test_mse": 0.01},
        opset=18,
        sha256="0" * 64,
        parity_max_abs_diff=2e-7,
        parity_samples=1000,
        library_versions={"onnx": "1.0"},
        created="2025-01-01T00:00:00+00:00",
    )


def card_dict(**changes) -> dict:
    data = json.loads(json.dumps(make_card().to_dict()))
    data.update(changes)
    return data


def test_write_version_round_trips_card_and_stamps_version_and_sha256(tmp_path):
    path = write_version(tmp_path, "digits", b"onnx-bytes", make_card())
    assert path == tmp_path / "digits" / "1"
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.onnx"]
    card = read_model_card(path / "model.json")
    assert card == dataclasses.replace(
        make_card(), sha256=hashlib.sha256(b"onnx-bytes").hexdigest()
    )
    assert hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest() == card.sha256


def test_write_version_accepts_a_file_path(tmp_path):
    source = tmp_path / "staged.onnx"
    source.write_bytes(b"from-a-file")
    path = write_version(tmp_path / "repo", "digits", source, make_card())
    assert (path / "model.onnx").read_bytes() == b"from-a-file"


def test_versions_count_up_and_never_overwrite(tmp_path):
    for expected, payload in enumerate([b"a", b"b", b"c"], start=1):
        assert next_version(tmp_path, "digits") == expected
        path = write_version(tmp_path, "digits", payload, make_card())
        assert path.name == str(expected)
    assert [(tmp_path / "digits" / v / "model.onnx").read_bytes() for v in "123"] == [
        b"a",
        b"b",
        b"c",
    ]
    assert next_version(tmp_path, "other") == 1


def test_next_version_skips_gaps_and_ignores_non_version_folders(tmp_path):
    for folder in ["1", "7", ".tmp-abc", "latest", "007", "0"]:
        (tmp_path / "digits" / folder).mkdir(parents=True)
    assert next_version(tmp_path, "digits") == 8


def test_concurrent_writers_get_distinct_versions(tmp_path):
    paths, errors = [], []

    def export(i: int) -> None:
        try:
            paths.append(write_version(tmp_path, "digits", b"model-%d" % i, make_card()))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(int(p.name) for p in paths) == [1, 2, 3, 4, 5, 6]
    versions = scan_repository(tmp_path)
    assert [v.status for v in versions] == ["ok"] * 6
    assert sorted((tmp_path / "digits").iterdir()) == sorted(paths)


def test_failure_inside_write_leaves_no_version_and_no_temp_folder(tmp_path, monkeypatch):
    write_version(tmp_path, "digits", b"first", make_card())
    real_write = repository._write_file

    def fail_on_card(path, data):
        if path.name == "model.json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(repository, "_write_file", fail_on_card)
    with pytest.raises(RepositoryError, match="No space left on device"):
        write_version(tmp_path, "digits", b"second", make_card())
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["1"]
    assert next_version(tmp_path, "digits") == 2


def test_unwritable_repository_gives_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(
            RepositoryError, match=f"cannot write to model repository folder {tmp_path}"
        ):
            write_version(tmp_path, "digits", b"x", make_card())
    finally:
        tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []


def test_repository_path_blocked_by_a_file_gives_clear_error(tmp_path):
    (tmp_path / "exported").write_text("a file where the repository should be")
    with pytest.raises(RepositoryError, match="cannot write to model repository folder"):
        write_version(tmp_path / "exported", "digits", b"x", make_card())


def test_write_version_rejects_bad_names(tmp_path):
    for name in ["", ".hidden", "-dash", "a/b", "sp ace"]:
        with pytest.raises(RepositoryError, match="model name"):
            write_version(tmp_path, name, b"x", make_card(name))
    with pytest.raises(RepositoryError, match="expected 'digits', got 'other'"):
        write_version(tmp_path, "digits", b"x", make_card("other"))
    assert list(tmp_path.iterdir()) == []


def test_scan_refuses_tampered_and_unreadable_versions_and_lists_the_rest(tmp_path):
    for payload in [b"v1", b"v2", b"v3"]:
        write_version(tmp_path, "digits", payload, make_card())
    write_version(tmp_path, "mnist", b"m1", make_card("mnist"))
    (tmp_path / "digits" / "2" / "model.onnx").write_bytes(b"tampered")
    (tmp_path / "digits" / "3" / "model.json").write_text("{not json")
    (tmp_path / ".tmp-half").mkdir()
    (tmp_path / "README.txt").write_text("not a model")

    versions = scan_repository(tmp_path)
    assert [(v.name, v.version, v.status) for v in versions] == [
        ("digits", 1, "ok"),
        ("digits", 2, "refused"),
        ("digits", 3, "refused"),
        ("mnist", 1, "ok"),
    ]
    assert "sha256 mismatch" in versions[1].error and "digits/2/model.onnx" in versions[1].error
    assert "not valid JSON" in versions[2].error and versions[2].card is None
    assert latest_version(versions, "digits").version == 1
    assert latest_version(versions, "mnist").model_path == tmp_path / "mnist" / "1" / "model.onnx"
    assert latest_version(versions, "absent") is None


def test_scan_refuses_a_card_copied_into_another_version(tmp_path):
    write_version(tmp_path, "digits", b"v1", make_card())
    (tmp_path / "digits" / "5").mkdir()
    for file in ["model.onnx", "model.json"]:
        (tmp_path / "digits" / "5" / file).write_bytes(
            (tmp_path / "digits" / "1" / file).read_bytes()
        )
    refused = scan_repository(tmp_path)[1]
    assert refused.version == 5 and "card says digits/1, folder is digits/5" in refused.error


def test_scan_missing_root_is_an_error(tmp_path):
    with pytest.raises(RepositoryError, match="not a directory"):
        scan_repository(tmp_path / "absent")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sha256": "ABC"}, "field 'sha256': expected 64 lowercase hex digits"),
        ({"version": 0}, "field 'version': expected a positive integer, got 0"),
        ({"version": True}, "field 'version': expected a positive integer"),
        ({"name": "../etc"}, "field 'name': expected a model name"),
        (
            {"created": "2025-01-01T00:00:00"},
            "field 'created': expected an ISO 8601 time with a time zone",
        ),
        ({"metrics": {"test_mse": "low"}}, "field 'metrics.test_mse': expected a number"),
        ({"dataset": {"split": "test"}}, "missing field 'dataset.name'"),
        (
            {"score": {"name": "reconstruction_error", "dtype": "float32"}},
            "missing field 'score.percentiles'",
        ),
        (
            {
                "score": {
                    "name": "reconstruction_error",
                    "dtype": "float32",
                    "measure": "mse",
                    "calibration_split": "val",
                    "calibration_rows": 3,
                    "percentiles": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
                }
            },
            "missing field 'score.percentiles.p99.9'",
        ),
        (
            {
                "input": {
                    "name": "pixels",
                    "shape": [1, 0, 8],
                    "dtype": "float32",
                    "value_range": [0, 16],
                }
            },
            "field 'input.shape': expected a non-empty list of positive integers",
        ),
        (
            {
                "input": {
                    "name": "pixels",
                    "shape": [1, 8, 8],
                    "dtype": "float32",
                    "value_range": [16, 0],
                }
            },
            "field 'input.value_range': expected \\[low, high\\] with low < high",
        ),
        (
            {"output": {"name": "embedding", "dtype": "float32"}},
            "missing field 'output.embedding_dim'",
        ),
        (
            {"library_versions": {"onnx": 1}},
            "field 'library_versions.onnx': expected a version string",
        ),
        # issue 24 #10: impossible values and fields the schema does not know, by name
        (
            {
                "input": {
                    "name": "pixels",
                    "shape": [1, 8, 8],
                    "dtype": "int64",
                    "value_range": [0, 16],
                }
            },
            "field 'input.dtype': expected one of 'float32', got 'int64'",
        ),
        (
            {"output": {"name": "embedding", "dtype": "float64", "embedding_dim": 8}},
            "field 'output.dtype': expected one of 'float32', got 'float64'",
        ),
        ({"licence": "MIT"}, "unknown field 'licence': expected only architecture, "),
        (
            {
                "output": {
                    "name": "embedding",
                    "dtype": "float32",
                    "embedding_dim": 8,
                    "normalised": True,
                }
            },
            "unknown field 'output.normalised': expected only dtype, embedding_dim, name",
        ),
    ],
)
def test_invalid_card_fields_are_named(tmp_path, changes, message):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(card_dict(**changes)))
    with pytest.raises(RepositoryError, match=message) as info:
        read_model_card(path)
    assert str(path) in str(info.value)


def test_every_card_field_is_required_but_the_score_and_the_standardizer(tmp_path):
    # absent from cards exported before they existed; `classifier`: only heads have one
    optional = {"score", "standardizer", "classifier"}
    for field in dataclasses.fields(ModelCard):
        if field.name in optional:
            assert field.default is None
            continue
        data = card_dict()
        del data[field.name]
        path = tmp_path / "model.json"
        path.write_text(json.dumps(data))
        with pytest.raises(RepositoryError, match=f"missing field '{field.name}'"):
            read_model_card(path)


def classifier_dict(**changes) -> dict:
    data = card_dict()
    data["output"] = {"name": "probabilities", "dtype": "float32", "embedding_dim": 3}
    data["classifier"] = {
        "labels": ["cat", "dog", "emu"],
        "encoder": {"name": "digits", "version": 2, "sha256": "a" * 64},
        "head": "logreg",
        "settings": {"C": 1.0},
        **changes,
    }
    return data


def test_classifier_card_round_trips(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(classifier_dict()))
    card = read_model_card(path)
    assert card.classifier.labels == ("cat", "dog", "emu")
    assert card.classifier.encoder == {"name": "digits", "version": 2, "sha256": "a" * 64}
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert "classifier" not in ModelCard.from_dict(card_dict()).to_dict()  # encoders: absent


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": ["cat", "dog"]}, "field 'classifier.labels': expected one label per output"),
        ({"labels": ["cat", "", "emu"]}, "field 'classifier.labels': expected a list of non-empty"),
        (
            {"encoder": {"name": "digits", "version": 2, "sha256": "nope"}},
            "field 'classifier.encoder.sha256': expected 64 lowercase hex digits",
        ),
        (
            {"encoder": {"name": "digits", "sha256": "a" * 64}},
            "missing field 'classifier.encoder.version'",
        ),
    ],
)
def test_bad_classifier_section_is_named(tmp_path, changes, message):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(classifier_dict(**changes)))
    with pytest.raises(RepositoryError, match=re.escape(message)):
        read_model_card(path)


def test_missing_card_file_is_named(tmp_path):
    with pytest.raises(RepositoryError, match=f"cannot read model card {tmp_path / 'model.json'}"):
        read_model_card(tmp_path / "model.json")


def test_committed_default_model_is_intact_and_meets_its_targets():
    import numpy as np
    import onnxruntime
    from sklearn.datasets import load_digits

    root = Path(__file__).resolve().parents[1] / "exported"
    versions = scan_repository(root)
    assert [v.error for v in versions] == [None] * len(versions)
    digits = latest_version(versions, "digits")
    card = digits.card
    assert (
        digits.version == 1
        and hashlib.sha256(digits.model_path.read_bytes()).hexdigest() == card.sha256
    )
    # weights plus the training codes of the density term (1,131 x 32 float32)
    assert digits.model_path.stat().st_size < 400_000
    assert (card.input.shape, card.input.value_range, card.output.embedding_dim) == (
        (1, 8, 8),
        (0.0, 16.0),
        32,
    )
    # The images-small recipe: codes made for probes (input-only augmentation), not for
    # reconstruction (its test MSE is above PCA-32's); the demo's table compares its probes
    # with pixels (docs/training.md).
    assert card.metrics["probe_accuracy_1257_labels"] >= 0.97
    assert card.metrics["probe_accuracy_100_labels"] >= 0.92

    session = onnxruntime.InferenceSession(
        str(digits.model_path), providers=["CPUExecutionProvider"]
    )
    pixels = load_digits().images[:33, None].astype(np.float32)  # raw 0..16, as the card says
    for batch in (1, 33):
        (embedding,) = session.run([card.output.name], {card.input.name: pixels[:batch]})
        assert embedding.shape == (batch, card.output.embedding_dim)
        assert embedding.dtype == np.float32 and np.isfinite(embedding).all()


def test_files_honour_the_umask_and_a_failed_first_write_leaves_no_model_folder(
    tmp_path, monkeypatch
):
    """Issue 24 #9: versions, outputs and checkpoints are 0644/0755 under umask 022 (not
    mkstemp's 0600); a failed write of a model's first version leaves no empty folder."""
    from aet.files import atomic_write

    previous = os.umask(0o022)
    try:
        folder = write_version(tmp_path, "digits", b"model", make_card())
        atomic_write(tmp_path / "out.npz", lambda t: t.write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "out.npz").stat().st_mode) == 0o644

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository, "_write_file", full_disk)
    with pytest.raises(RepositoryError, match="No space left on device"):
        write_version(tmp_path, "other", b"model", make_card(name="other"))
    assert not (tmp_path / "other").exists()


def test_staging_folders_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """Issue 24 #9: a killed export's `.tmp-<host>.<pid>.<random>` goes at the next write of
    that model; a live writer's (this process) and another host's stay."""
    host = socket.gethostname().replace(".", "-")
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()  # a writer that has ended
    model_dir = tmp_path / "digits"
    dead = model_dir / f".tmp-{host}.{dead_pid.pid}.0a1b2c3d"
    live = model_dir / f".tmp-{host}.{os.getpid()}.0a1b2c3d"
    remote = model_dir / f".tmp-elsewhere.{dead_pid.pid}.0a1b2c3d"
    for staging in (dead, live, remote):
        (staging / "model.onnx").parent.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(b"half")
    write_version(tmp_path, "digits", b"model", make_card())
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["1", live.name, remote.name])
