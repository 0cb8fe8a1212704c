"""`bench/extract.py --rows 3000`: the scale figure's whole path on 3,000 rows (the MNIST test set
tiled into uncompressed IDX files, a local and a Ray job, each in its own process, every row
checked once), on a tiny real 28x28 encoder so that no trained MNIST model
is needed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aet.clients.rows import _loaded, plan_rows
from aet.repository import InputSpec, ModelCard, OutputSpec, write_version
from aet.training.data import default_mnist_dir, read_idx
from aet.training.dataspec import DataSpec
from aet.training.mapped import MappedImages

BENCH = Path(__file__).resolve().parents[1] / "bench" / "extract.py"
SHAPE = (1, 28, 28)
DIM = 4


def tiny_mnist_encoder(root: Path) -> None:
    """exported/mnist/1: flatten(pixels / 255) @ W, a real ONNX graph for 28x28 images."""
    weights = np.random.default_rng(0).standard_normal((784, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["pixels", "raw_max"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
        ],
        "tiny_mnist_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [
            numpy_helper.from_array(np.array(255.0, np.float32), "raw_max"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    card = ModelCard.draft(
        "mnist",
        "linear",
        InputSpec("pixels", SHAPE, "float32", (0.0, 255.0)),
        OutputSpec("embedding", "float32", DIM),
        preprocessing=["divide by 255", "flatten"],
        dataset={"name": "mnist-idx"},
        opset=17,
        library_versions={"onnx": onnx.__version__},
    )
    write_version(root, "mnist", model.SerializeToString(), card)


@pytest.mark.skipif(not default_mnist_dir().is_dir(), reason="MNIST test set not at hand")
def test_scale_run_reports_local_and_ray(tmp_path):
    tiny_mnist_encoder(tmp_path / "exported")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rows=3000",
            "--workers=1",
            "--shard-size=1024",
            f"--repository={tmp_path / 'exported'}",
            f"--results={tmp_path / 'results'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "extract-scale.json").read_text())["scale"]
    assert [(r["rows"], r["backend"].split()[0]) for r in report] == [
        (3000, "local"),
        (3000, "ray"),
    ]
    assert all(r["rows_per_second"] > 0 and r["peak_driver_rss_mb"] > 0 for r in report)
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
