"""`aet demo` end to end in a child process: a real `aet serve` child of its own on a free port,
extraction through gRPC, the probe table, a classifier head fitted, exported, loaded and
served, a clean server stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_MODEL

from aet.clients.embeddings import read_embeddings
from aet.clients.probe import dataset_of
from aet.errors import UserError
from aet.repository import scan_repository
from aet.training.probes import tune_logistic

DEMO_SECONDS = 600  # a hung server or client fails the test instead of the whole session


def run_demo(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aet.cli", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS,
    )


def test_demo_serves_embeds_probes_and_stops(tmp_path, model_repository):
    done = run_demo(
        "--repository",
        str(model_repository),
        "--output",
        str(tmp_path / "demo"),
        "--label-counts",
        "100",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "server: aet serve on 127.0.0.1:" in out
    assert "embedded 1797 rows in " in out and "rows/s, server 127.0.0.1:" in out
    assert "server: stopped (exit code 0)" in out
    assert "| features | classifier | 100 labels | all (1,257) |" in out
    results = json.loads((tmp_path / "demo" / "probe" / "results.json").read_text())
    assert results["model"]["name"] == DIGITS_MODEL
    assert results["accuracy"]["embedding"]["logreg"][-1] >= 0.65  # see test_probe's floors
    assert results["accuracy"]["pixels"]["logreg"][-1] >= 0.93
    for plot in ("accuracy_vs_labels.png", "confusion_matrix.png"):
        assert (tmp_path / "demo" / "probe" / plot).stat().st_size > 10_000
    log = (tmp_path / "demo" / "server.log").read_text()
    assert "shutdown_finished" in log

    # The loop closed: the head served over gRPC predicts exactly what the head fitted
    # in-process on the demo's embeddings predicts (refitted here, deterministically).
    head = json.loads((tmp_path / "demo" / "head.json").read_text())
    table = read_embeddings(tmp_path / "demo" / "embeddings.npz")
    dataset = dataset_of(table, "demo embeddings")
    fit_x = np.concatenate([table.part("train")[0], table.part("val")[0]])
    tuned = tune_logistic(fit_x, dataset.fit.y, seed=0)
    assert head["served_test_predictions"] == tuned.model.predict(table.part("test")[0]).tolist()
    assert head["served_test_accuracy"] == head["fitted_test_accuracy"] >= 0.65
    assert f"served over gRPC {head['served_test_accuracy']:.4f} (540 rows)" in out
    assert "digits-head v1 at fit time" in out
    # The head went into the demo's own repository, never into the one it was given.
    served = [f"{v.name}/{v.version}" for v in scan_repository(tmp_path / "demo" / "repository")]
    assert served == [f"{DIGITS_MODEL}/1", f"{DIGITS_MODEL}-head/1"]
    assert [v.name for v in scan_repository(model_repository)] == [DIGITS_MODEL]


def test_demo_without_a_model_says_how_to_make_one(tmp_path):
    (tmp_path / "exported").mkdir()
    done = run_demo("--dataset", "mnist-idx", cwd=tmp_path)
    assert done.returncode == 2
    assert (
        "exported/mnist: no such model; run `aet demo --pretrain --dataset mnist-idx`"
        in done.stderr
    )


def test_demo_outside_a_checkout_serves_the_installed_encoder(tmp_path, monkeypatch):
    """From a folder without exported/, the default repository falls back to the encoder
    installed with the package (package data); another repository given does not."""
    from aet.clients.demo import DemoConfig, serving_repository, shipped_model_dir

    monkeypatch.chdir(tmp_path)
    shipped = shipped_model_dir("digits")
    assert shipped is not None and (shipped / "1" / "calibration.npy").is_file()
    root = serving_repository(DemoConfig(output=tmp_path / "out"))
    assert sorted(p.name for p in (root / "digits" / "1").iterdir()) == [
        "calibration.npy",
        "model.json",
        "model.onnx",
    ]
    assert scan_repository(root)
    with pytest.raises(UserError, match="elsewhere/digits: no such model"):
        serving_repository(DemoConfig(repository=Path("elsewhere"), output=tmp_path / "o2"))
