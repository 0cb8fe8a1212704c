"""`aet demo` end to end in a child process: a real `aet serve` child of its own on a free port,
extraction through gRPC, the probe table, a clean server stop."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import DIGITS_MODEL

DEMO_SECONDS = 300  # a hung server or client fails the test instead of the whole session


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


def test_demo_without_a_model_says_how_to_make_one(tmp_path):
    (tmp_path / "exported").mkdir()
    done = run_demo("--dataset", "mnist-idx", cwd=tmp_path)
    assert done.returncode == 2
    assert (
        "exported/mnist: no such model; run `aet demo --pretrain --dataset mnist-idx`"
        in done.stderr
    )
