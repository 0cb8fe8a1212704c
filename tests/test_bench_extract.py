"""`bench/extract.py --rows 3000`: the scale figure's whole path on 3,000 rows (the MNIST test set
tiled into uncompressed IDX files, a local and a Ray job, each in its own process, every row
checked once, and the local job's memory at 750 and 3,000 rows), on the bench's linear 28x28
encoder (`--linear-dim`) so that no trained MNIST model is needed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aet.clients.rows import _loaded, plan_rows
from aet.training.data import default_mnist_dir, read_idx
from aet.training.dataspec import DataSpec
from aet.training.mapped import MappedImages

BENCH = Path(__file__).resolve().parents[1] / "bench" / "extract.py"


@pytest.mark.skipif(not default_mnist_dir().is_dir(), reason="MNIST test set not at hand")
def test_scale_run_reports_local_and_ray(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rows=3000",
            "--workers=1",
            "--shard-size=1024",
            "--linear-dim=4",
            f"--results={tmp_path / 'results'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "extract-scale.json").read_text())
    report = results["scale"]
    assert [(r["rows"], r["backend"].split()[0]) for r in report] == [
        (750, "local"),  # one row count: the local job at a quarter of it too
        (3000, "local"),
        (3000, "ray"),
    ]
    assert all(r["rows_per_second"] > 0 and r["peak_driver_rss_mb"] > 0 for r in report)
    memory = results["local_memory"]
    assert memory["rows"] == [750, 3000] and memory["embeddings_mb"] == [
        rows * 4 * 4 / 2**20 for rows in (750, 3000)
    ]
    assert all(rss > 0 for rss in memory["peak_rss_mb"])
    assert "local job peak RSS: " in done.stdout and "MB at 3,000 rows" in done.stdout
    assert (
        "| 3,000 | ray (1 actors, cpu) |" in (tmp_path / "results" / "extract-scale.md").read_text()
    )


@pytest.mark.skipif(not default_mnist_dir().is_dir(), reason="MNIST test set not at hand")
def test_tiled_mnist_repeats_the_test_set(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_extract", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = bench.tile_mnist(None, 25_000, tmp_path / "tiled")
    spec = DataSpec("mnist-idx", folder)
    plan = plan_rows(spec)
    images = _loaded(spec).pool.x
    assert len(plan) == 25_000 and isinstance(images, MappedImages)
    test_set = read_idx(default_mnist_dir() / "t10k-images-idx3-ubyte.gz")[:, None]
    test_set = test_set.astype(np.float32) / np.float32(255)  # the loader's scaling
    for start in (0, 10_000):
        np.testing.assert_array_equal(images[start : start + 10_000], test_set)
    np.testing.assert_array_equal(images[20_000:25_000], test_set[:5_000])
