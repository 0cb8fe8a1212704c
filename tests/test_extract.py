"""`aet embed`: the same embeddings through the server, in-process onnxruntime and local Ray;
rows planned from labels match the data set; atomic `.npz`/Parquet outputs; shards that survive
an interrupted job and resume it; Ray output folders that resume at block level."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_MODEL, Interrupted, InterruptedAfter

from aet.cli import main
from aet.clients.backends import (
    BackendError,
    LocalBackend,
    RayBackend,
    ServerBackend,
    actor_device,
)
from aet.clients.client import EmbeddingClient
from aet.clients.embeddings import ExtractionError, read_embeddings
from aet.clients.extract import EmbedConfig, extract, extraction_rows
from aet.clients.rows import _loaded, _read, plan_rows, raw_pixels
from aet.config import ConfigError
from aet.encoder import Encoder
from aet.errors import UserError
from aet.repository import CALIBRATION_FILE, RepositoryError
from aet.training.data import DataError, load_dataset
from aet.training.dataspec import DataSpec
from aet.training.mapped import MappedImages

LIMIT = 400  # digits rows per job: five shards of 96, quick on any backend


def config(tmp_path, name: str, **values) -> EmbedConfig:
    values.setdefault("local", tmp_path / "unused")
    data = DataSpec(limit=LIMIT, **values.pop("data", {}))
    return EmbedConfig(
        data=data, shard_size=96, batch_size=40, progress=False, output=tmp_path / name, **values
    )


@pytest.fixture(scope="module")
def model_dir(model_repository):
    return model_repository / DIGITS_MODEL


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("digits", limit=LIMIT)


@pytest.fixture(scope="module")
def plan():
    return plan_rows(DataSpec(limit=LIMIT))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, plan):
    """The local backend's output for the job, scored: the embeddings, scores and p-values
    every other path must match."""
    folder = tmp_path_factory.mktemp("reference")
    with LocalBackend(model_dir, score=True) as backend:
        extract(config(folder, "local.npz", local=model_dir, score=True), backend, plan)
    return read_embeddings(folder / "local.npz")


@pytest.mark.parametrize(
    "cut",
    [
        {"limit": LIMIT},
        {"limit": None},
        {"limit": LIMIT, "test_fraction": 0.25, "val_fraction": 0.2},
    ],
)
def test_plan_from_labels_gives_the_rows_of_the_data_set(cut):
    dataset = load_dataset("digits", seed=3, **cut)
    rows = extraction_rows(dataset)
    plan = plan_rows(DataSpec(seed=3, **cut))
    block = plan.block(0, len(plan))
    np.testing.assert_array_equal(block["id"], np.arange(len(rows)))
    np.testing.assert_array_equal(block["pixels"], rows.pixels)
    np.testing.assert_array_equal(block["label"], rows.labels)
    np.testing.assert_array_equal(block["split"], rows.split)
    np.testing.assert_array_equal(plan.block(17, 90)["pixels"], rows.pixels[17:90])


def test_plan_reads_idx_files_block_by_block(tmp_path):
    """Uncompressed IDX files are mapped; blocks of rows match the loader's."""
    images = np.random.default_rng(0).integers(0, 256, (300, 6, 6), dtype=np.uint8)
    labels = np.arange(300, dtype=np.uint8) % 10
    for kind, array, magic in (("images", images, 3), ("labels", labels, 1)):
        header = bytes([0, 0, 8, magic]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (tmp_path / f"t10k-{kind}-idx{magic}-ubyte").write_bytes(header + array.tobytes())
    dataset = load_dataset("mnist-idx", tmp_path, seed=1, limit=250)
    rows = extraction_rows(dataset)
    spec = DataSpec("mnist-idx", tmp_path, seed=1, limit=250)
    plan = plan_rows(spec)
    assert isinstance(_loaded(spec).pool.x, MappedImages)
    pixels = np.concatenate([plan.pixels(a, min(a + 64, 250)) for a in range(0, 250, 64)])
    np.testing.assert_array_equal(pixels, rows.pixels)
    np.testing.assert_array_equal(plan.labels, rows.labels)


def test_raw_pixels_recover_bytes_exactly(dataset):
    rows = extraction_rows(dataset)
    assert rows.pixels.dtype == np.uint8 and rows.pixels.max() == 16
    np.testing.assert_array_equal(
        rows.pixels / np.float32(16),
        np.concatenate([dataset.train.x, dataset.val.x, dataset.test.x]),
    )
    halves = np.full((2, 1, 2, 2), 0.5, np.float32)
    assert raw_pixels(halves, 1.0).dtype == np.float32  # not bytes: stays float


def test_output_holds_every_split_with_labels_and_provenance(reference, dataset, model_dir):
    assert len(reference.ids) == LIMIT and reference.embeddings.shape[1] == 8
    np.testing.assert_array_equal(reference.ids, np.arange(LIMIT))
    for name in ("train", "val", "test"):
        _, labels = reference.part(name)
        np.testing.assert_array_equal(labels, getattr(dataset, name).y)
    assert reference.metadata["dataset"] == {
        "name": "digits",
        "path": None,
        "seed": 0,
        "test_fraction": None,
        "val_fraction": 0.1,
        "limit": LIMIT,
    }
    card = json.loads((model_dir / "1" / "model.json").read_text())
    assert reference.metadata["model"]["sha256"] == card["sha256"]
    assert np.isfinite(reference.embeddings).all() and reference.embeddings.std() > 0


def test_server_and_ray_backends_match_local(
    tmp_path, model_dir, plan, reference, embedding_server
):
    target = f"127.0.0.1:{embedding_server.port}"
    with ServerBackend(EmbeddingClient(target), DIGITS_MODEL, score=True) as backend:
        served = extract(config(tmp_path, "served.parquet", score=True), backend, plan)
    with RayBackend(model_dir, workers=2, score=True) as backend:
        job = config(tmp_path, "ray.parquet", local=None, ray=model_dir, score=True)
        on_ray = extract(job, backend)
        assert (tmp_path / "ray.parquet").is_dir()
        _ray_job_resumes_from_its_finished_blocks(tmp_path / "ray.parquet", model_dir, backend)
        missing = DataSpec("npz", tmp_path / "absent.npz")
        with pytest.raises(DataError, match=r"absent\.npz: no such file"):
            backend.plan(missing)  # the worker's error, as the job's own
    assert served.embedded_rows == on_ray.embedded_rows == LIMIT
    for path in (served.output, on_ray.output):
        table = read_embeddings(path)
        np.testing.assert_allclose(table.embeddings, reference.embeddings, rtol=0, atol=1e-5)
        np.testing.assert_allclose(table.scores, reference.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(table.p_values, reference.p_values, rtol=0, atol=1e-6)
        assert table.metadata["p_value"] == reference.metadata["p_value"]
        np.testing.assert_array_equal(table.labels, reference.labels)
        np.testing.assert_array_equal(table.split, reference.split)
    assert not list(tmp_path.glob("*.shards"))  # merged and cleaned up


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_a_scored_job_writes_the_p_values_of_aet_encoder(tmp_path, model_dir, plan, suffix):
    """`--score` writes `p_value` beside `reconstruction_error`: what `aet.Encoder.p_value`
    gives the same rows, and metadata naming the calibration scores they come from."""
    job = config(tmp_path, f"scored{suffix}", local=model_dir, score=True)
    with LocalBackend(model_dir, score=True) as backend:
        extract(job, backend, plan)
    table = read_embeddings(job.output)
    expected = Encoder.load(model_dir, threads=1).p_value(plan.pixels(0, LIMIT))
    assert table.p_values.dtype == np.float32
    np.testing.assert_allclose(table.p_values, expected, rtol=0, atol=1e-6)
    assert (table.p_values > 0).all() and (table.p_values <= 1).all()
    assert len(np.unique(table.p_values)) > 10  # not a constant column
    score = json.loads((model_dir / "1" / "model.json").read_text())["score"]
    assert table.metadata["p_value"]["column"] == "p_value"
    assert table.metadata["p_value"]["calibration_sha256"] == score["calibration_sha256"]


def test_a_model_without_calibration_data_writes_the_score_alone(
    tmp_path, model_dir, plan, reference, caplog, monkeypatch
):
    """A version exported before p-values (no calibration file): `--score` still writes the
    score and leaves `p_value` out, with one warning line saying why. An unfinished job that
    has p-values is not resumed by it (the manifest's `p_value` differs): no mixed shards."""
    old = tmp_path / "old" / DIGITS_MODEL
    shutil.copytree(model_dir, old)
    card = json.loads((old / "1" / "model.json").read_text())
    del card["score"]["calibration_file"], card["score"]["calibration_sha256"]
    (old / "1" / "model.json").write_text(json.dumps(card))
    (old / "1" / CALIBRATION_FILE).unlink()
    job = config(tmp_path, "job.npz", local=old, score=True)

    with LocalBackend(model_dir, score=True) as backend:  # with p-values: stopped after shard 0
        embed_rows, shards = backend.embed_rows, itertools.count()

        def first_shard_only(pixels, batch_size):
            if next(shards):
                raise Interrupted
            return embed_rows(pixels, batch_size)

        monkeypatch.setattr(backend, "embed_rows", first_shard_only)
        with pytest.raises(Interrupted):
            extract(job, backend, plan)
    with caplog.at_level(logging.WARNING, "aet.clients.backends"):
        backend = LocalBackend(old, score=True)
    assert [record.getMessage() for record in caplog.records] == [
        "model digits v1 has no calibration data (exported before p-values): writing "
        "reconstruction_error without p_value; export it again for p-values"
    ]
    with backend:
        with pytest.raises(
            ExtractionError, match=r"field 'p_value': this job has None, the unfinished one has"
        ):
            extract(job, backend, plan)
        shutil.rmtree(tmp_path / "job.npz.shards")
        extract(job, backend, plan)
    table = read_embeddings(job.output)
    assert table.p_values is None and table.metadata["p_value"] is None
    np.testing.assert_allclose(table.scores, reference.scores, rtol=0, atol=1e-6)


def _ray_job_resumes_from_its_finished_blocks(folder, model_dir, backend):
    """A crash leaves a cut-short file and an unfinished manifest: the rerun redoes only the
    blocks that file held, and every row is there once."""
    reference = read_embeddings(folder)
    files = sorted(folder.glob("*.parquet"))
    assert len(files) >= 4  # at most one block (96 rows) per file
    files[1].write_bytes(files[1].read_bytes()[:100])  # cut short by a crash
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ExtractionError, match="unfinished job; run the same aet embed"):
        read_embeddings(folder)

    job = config(folder.parent, folder.name, local=None, ray=model_dir, score=True)
    resumed = extract(job, backend)
    assert 0 < resumed.embedded_rows <= 2 * 96
    table = read_embeddings(folder)
    np.testing.assert_array_equal(table.ids, np.arange(LIMIT))
    np.testing.assert_array_equal(table.embeddings, reference.embeddings)
    np.testing.assert_array_equal(table.p_values, reference.p_values)


def test_ray_actors_reserve_a_gpu_when_cuda_is_chosen():
    assert actor_device("auto", cluster_gpus=0) == ("cpu", 0)
    assert actor_device("auto", cluster_gpus=2) == ("cuda", 1)
    assert actor_device("cpu", cluster_gpus=2) == ("cpu", 0)
    assert actor_device("cuda", cluster_gpus=1) == ("cuda", 1)
    with pytest.raises(BackendError, match="cuda needs GPUs in the Ray cluster; got 0 GPUs"):
        actor_device("cuda", cluster_gpus=0)
    with pytest.raises(BackendError, match="device: expected one of auto, cpu, cuda, got 'tpu'"):
        actor_device("tpu", cluster_gpus=0)


def test_interrupted_job_resumes_from_its_finished_shards(tmp_path, model_dir, plan, reference):
    job = config(tmp_path, "resumed.npz", local=model_dir)
    with pytest.raises(Interrupted), InterruptedAfter(model_dir, blocks=7) as backend:
        extract(job, backend, plan)  # blocks of 40, 40, 16 rows per shard: shards 0 and 1
    shards = tmp_path / "resumed.npz.shards"
    assert sorted(p.name for p in shards.glob("shard-*.npz")) == [
        "shard-00000.npz",
        "shard-00001.npz",
    ]
    assert not job.output.exists()
    (shards / "shard-00001.npz").write_bytes(b"truncated by a crash")  # fails validation

    with LocalBackend(model_dir) as backend:
        summary = extract(job, backend, plan)
    assert summary.embedded_rows == LIMIT - 96  # shard 0 reused, the broken shard 1 redone
    assert "96 rows from finished shards" in summary.line()
    resumed = read_embeddings(job.output)
    np.testing.assert_array_equal(resumed.embeddings, reference.embeddings)
    assert not shards.exists()


def test_unfinished_job_of_other_arguments_is_refused(tmp_path, model_dir, plan):
    with pytest.raises(Interrupted), InterruptedAfter(model_dir, blocks=3) as backend:
        extract(config(tmp_path, "job.npz", local=model_dir), backend, plan)
    other = config(tmp_path, "job.npz", local=model_dir, data={"seed": 1})
    with pytest.raises(ExtractionError, match=r"field 'dataset'.*'seed': 1.*'seed': 0"):
        with LocalBackend(model_dir) as backend:
            extract(other, backend)


def test_existing_output_needs_overwrite(tmp_path, model_dir, plan):
    job = config(tmp_path, "once.npz", local=model_dir)
    with LocalBackend(model_dir) as backend:
        extract(job, backend, plan)
        with pytest.raises(ExtractionError, match="already exists; pass --overwrite"):
            extract(job, backend, plan)


def test_model_for_other_images_is_refused(tmp_path, model_dir):
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images, y=np.arange(30) % 3)
    data = {"dataset": "npz", "data_path": tmp_path / "images.npz"}
    job = config(tmp_path, "mismatch.npz", local=model_dir, data=data)
    with LocalBackend(model_dir) as backend:
        with pytest.raises(ExtractionError, match=r"shape \(1, 8, 8\).*up to 16.*\(1, 28, 28\)"):
            extract(job, backend)


def test_config_and_model_folder_errors(tmp_path, model_dir):
    with pytest.raises(
        ConfigError, match="exactly one of --server, --local, --ray; got --server, --local"
    ):
        EmbedConfig(server="127.0.0.1:1", model="m", local=model_dir)
    with pytest.raises(ConfigError, match="--server 127.0.0.1:1 needs --model"):
        EmbedConfig(server="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"ending in \.npz or \.parquet; got out\.csv"):
        EmbedConfig(local=model_dir, output=Path("out.csv"))
    with pytest.raises(ConfigError, match=r"--ray writes a folder of Parquet files.*got out\.npz"):
        EmbedConfig(ray=model_dir, output=Path("out.npz"))
    assert EmbedConfig(ray=model_dir).output_path == Path("extracted/digits.parquet")
    with pytest.raises(ConfigError, match=r"device: only for --local or --ray .*got --device cpu"):
        EmbedConfig(server="127.0.0.1:1", model="m", device="cpu")
    with pytest.raises(RepositoryError, match="no such folder"):
        LocalBackend(tmp_path / "absent")


def test_local_backend_runs_on_the_device_asked_for(model_dir, plan):
    with LocalBackend(model_dir, device="cpu") as backend:
        assert backend.label == "local onnxruntime (CPUExecutionProvider)"
        rows = plan.pixels(0, 4)
        with LocalBackend(model_dir) as auto:  # auto: the same codes on whatever it chose
            np.testing.assert_allclose(
                np.concatenate([block["embedding"] for block in backend.embed_rows(rows, 4)]),
                np.concatenate([block["embedding"] for block in auto.embed_rows(rows, 4)]),
                atol=1e-5,
            )
    if "CUDA" not in LocalBackend(model_dir).label:  # no usable GPU: cuda is refused by name
        with pytest.raises(UserError, match=r"device: expected a usable CUDA GPU for 'cuda'"):
            LocalBackend(model_dir, device="cuda")


def test_tampered_model_is_refused(tmp_path, model_dir):
    copy = tmp_path / "exported" / DIGITS_MODEL
    shutil.copytree(model_dir, copy)
    with open(copy / "1" / "model.onnx", "ab") as model:
        model.write(b"tampered")
    with pytest.raises(RepositoryError, match=r"digits/1: refused: .*sha256 mismatch"):
        LocalBackend(copy / "1")
    with pytest.raises(RepositoryError, match=r"no usable version \(v1: .*sha256 mismatch"):
        RayBackend(copy, workers=1)  # refused before Ray starts


def test_cli_prints_a_summary_with_rows_per_second(tmp_path, model_dir, capsys):
    output = tmp_path / "cli.parquet"
    code = main(
        [
            "embed",
            "--local",
            str(model_dir),
            "--limit",
            str(LIMIT),
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"embedded {LIMIT} rows in ") and "rows/s, local onnxruntime" in line
    assert read_embeddings(output).embeddings.shape == (LIMIT, 8)


def test_local_ray_that_misses_rays_startup_limits_is_started_afresh(monkeypatch):
    """Ray gives a local raylet a fixed 30 s to register, and its GCS server a configurable
    limit to write its port (we raise it to 120 s); a busy machine can miss them. Ray's own
    failures cannot be provoked on demand, so its `init` stands in, failing as Ray does."""
    import ray

    from aet.clients.backends import GCS_PORT_WAIT_S, RayStartTimeout, _start_local_ray

    calls = []

    def init(**options):
        calls.append(options["num_cpus"])
        if len(calls) == 1:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")
        if len(calls) < 3:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    _start_local_ray(2, tries=3)
    assert calls == [2, 2, 2]
    assert os.environ["RAY_gcs_server_port_wait_time_s"] == GCS_PORT_WAIT_S
    calls.clear()
    with pytest.raises(RayStartTimeout, match=r"timed out during startup.*\(2 tries\)"):
        _start_local_ray(2, tries=2)
    monkeypatch.setattr(ray, "init", lambda **options: (_ for _ in ()).throw(Exception("other")))
    with pytest.raises(Exception, match="^other$"):  # any other failure is not retried
        _start_local_ray(2)


def test_a_resumed_job_re_embeds_shards_whose_input_file_changed(tmp_path, vector_model):
    """FAULTS.md "Resumed jobs": kill mid-job, overwrite the npz with other rows of the same
    count, resume: the finished shards made from the old rows are embedded again, by name."""
    rng = np.random.default_rng(1)
    data = tmp_path / "table.npz"
    np.savez(data, x=rng.normal(size=(300, 6)).astype(np.float32))
    spec = {"dataset": "npz", "data_path": data, "limit": None}
    job = EmbedConfig(
        data=DataSpec(**spec),
        local=vector_model,
        shard_size=96,
        batch_size=48,
        progress=False,
        output=tmp_path / "job.npz",
    )
    with pytest.raises(Interrupted), InterruptedAfter(vector_model, blocks=4) as backend:
        extract(job, backend)  # shards 0 and 1 finished
    np.savez(data, x=rng.normal(size=(300, 6)).astype(np.float32))  # other rows, same count
    _read.cache_clear()  # the data set is read once per process: as a new process would
    with LocalBackend(vector_model) as backend:
        summary = extract(job, backend)
        assert summary.changed_rows == 192
        assert f"192 rows embedded again: {data} changed" in summary.line()
        clean = extract(dataclasses.replace(job, output=tmp_path / "clean.npz"), backend)
    np.testing.assert_array_equal(
        read_embeddings(job.output).embeddings, read_embeddings(clean.output).embeddings
    )


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_images_of_another_range_are_rescaled_into_the_models(tmp_path, model_dir, dtype):
    """Issue 24 #11: the digits encoder (0..16) on an npz of uint8 0..255 or float 0..1, the
    two forms an npz may hold: the job rescales and says so; `aet probe` does the same."""
    from sklearn.datasets import load_digits

    digits = load_digits().data.reshape(-1, 1, 8, 8)[:300]
    x = (digits * 15).astype(np.uint8) if dtype == "uint8" else digits / 16
    np.savez(tmp_path / "images.npz", x=x, y=np.arange(300) % 3)
    spec = DataSpec(dataset="npz", data_path=tmp_path / "images.npz")
    job = EmbedConfig(
        data=spec, local=model_dir, progress=False, output=tmp_path / "out.npz"
    ).with_model_data()
    with LocalBackend(model_dir) as backend:
        summary = extract(job, backend)
        in_model_units = digits * 15 * 16 / 255 if dtype == "uint8" else digits
        plan = plan_rows(job.data)
        rows = in_model_units[plan.positions].astype(np.float32)
        expected = next(iter(backend.embed_rows(rows, batch_size=len(rows))))
    raw_max = "255" if dtype == "uint8" else "1"
    assert f"pixels of npz rescaled from 0..{raw_max} to the model's 0..16" in summary.line()
    np.testing.assert_allclose(
        read_embeddings(job.output).embeddings,
        expected[backend.model.output_name],
        atol=1e-5,
    )


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_a_local_job_holds_one_shard_not_every_embedding(tmp_path, vector_model, suffix):
    """Issue 24 #12: the shards stream into the output (npz members, Parquet row groups), so
    the memory a job allocates (traced: numpy's and Python's, not onnxruntime's or Arrow's
    pools) does not grow with its rows; before, it held every shard, then their concatenation."""
    rng = np.random.default_rng(2)
    peaks, held = [], []
    for rows in (12_000, 48_000):
        data = tmp_path / f"table-{rows}.npz"
        np.savez(data, x=rng.normal(size=(rows, 6)).astype(np.float32))
        job = EmbedConfig(
            data=DataSpec("npz", data, limit=None),
            local=vector_model,
            score=True,
            shard_size=1024,
            batch_size=512,
            progress=False,
            output=tmp_path / f"job-{rows}{suffix}",
        )
        plan = plan_rows(job.data)  # the data set is read here, before tracing starts
        with LocalBackend(vector_model, score=True) as backend:
            tracemalloc.start()
            try:
                extract(job, backend, plan)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        table = read_embeddings(job.output)
        assert len(table.ids) == rows and table.scores is not None
        held.append(sum(a.nbytes for a in (table.embeddings, table.ids, table.labels, table.split)))
    # 36,000 more rows, 1.6 MB more table: the old merge's peak grew by 3.3 MB (npz)
    assert peaks[1] - peaks[0] < (held[1] - held[0]) / 10, (peaks, held)
    assert peaks[1] < held[1] / 2, (peaks, held)
