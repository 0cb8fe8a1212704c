"""The KServe v2 API on a real server: our own stubs, then clients nobody here wrote.

`tritonclient` runs in a child interpreter: its generated `inference.*` messages and ours share
names, and protobuf refuses two definitions of one name in one process. `perf_analyzer` (the
binary inside the tritonclient 2.51 wheel) runs a short, time-bounded concurrency sweep.
"""

from __future__ import annotations

import csv
import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import grpc
import numpy as np
import pytest
from kserve_harness import (
    EMBEDDING_DIM,
    MODEL,
    ROW_SHAPE,
    add_version,
    digits_pixels,
    expected_embeddings,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.proto import grpc_service_pb2 as pb
from aet.proto import model_config_pb2

SEED = 3  # weights of version 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    add_version(repository, SEED)
    live = start_kserve_server(repository, max_batch_size=8, max_request_rows=32)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield kserve_stub(channel)


def embeddings_of(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("embedding", "FP32")
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(output.shape)


def test_server_health_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1")).ready
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "ae-transfer"
    assert set(metadata.extensions) == {
        "classification",
        "model_configuration",
        "model_repository",
        "statistics",
    }


def test_model_metadata_leads_shapes_with_minus_one(stub):
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        MODEL,
        ["1"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("pixels", "FP32", [-1, *ROW_SHAPE])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("embedding", "FP32", [-1, EMBEDDING_DIM])
    ]


def test_model_config_describes_batching(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL, version="1")).config
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "onnxruntime_onnx", 32)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("pixels", model_config_pb2.TYPE_FP32, list(ROW_SHAPE))
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("embedding", model_config_pb2.TYPE_FP32, [EMBEDDING_DIM])
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_infer_raw_in_raw_out_matches_the_graph(stub):
    pixels = digits_pixels(5)
    response = stub.ModelInfer(kserve_request(pixels, id="req-7"))
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "req-7")
    np.testing.assert_allclose(
        embeddings_of(response), expected_embeddings(pixels, SEED), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "datatype, contents",
    [
        ("FP32", lambda p: pb.InferTensorContents(fp32_contents=p.ravel())),
        ("UINT8", lambda p: pb.InferTensorContents(uint_contents=p.astype(np.uint8).ravel())),
    ],
)
def test_infer_typed_contents_are_accepted(stub, datatype, contents):
    pixels = np.round(digits_pixels(3, seed=1))  # whole numbers: exact in UINT8 too
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype=datatype, shape=pixels.shape, contents=contents(pixels)
            )
        ],
    )
    np.testing.assert_allclose(
        embeddings_of(stub.ModelInfer(request)),
        expected_embeddings(pixels, SEED),
        rtol=1e-5,
        atol=1e-5,
    )


def test_stream_answers_in_order_and_survives_a_bad_request(stub):
    good = [digits_pixels(2, seed=s) for s in range(4)]
    requests = [kserve_request(p, id=f"r{i}") for i, p in enumerate(good)]
    bad = kserve_request(good[0], id="bad")
    bad.inputs[0].shape[:] = [2, 1, 8, 7]
    requests.insert(2, bad)
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [a.infer_response.id for a in answers] == ["r0", "r1", "bad", "r2", "r3"]
    assert "inputs[pixels].shape: expected [batch, 1, 8, 8], got [2, 1, 8, 7]" in (
        answers[2].error_message
    )
    for answer, pixels in zip(answers[:2] + answers[3:], good, strict=True):
        assert answer.error_message == ""
        np.testing.assert_allclose(
            embeddings_of(answer.infer_response),
            expected_embeddings(pixels, SEED),
            rtol=1e-5,
            atol=1e-5,
        )


def test_statistics_count_requests_queue_and_batches(stub):
    def stats():
        (only,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats
        return only

    before = stats()
    for _ in range(3):
        stub.ModelInfer(kserve_request(digits_pixels(2)))
    after = stats()
    assert (after.name, after.version) == (MODEL, "1")
    grew = {
        name: getattr(after.inference_stats, name).count
        - getattr(before.inference_stats, name).count
        for name in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    }
    assert grew == dict.fromkeys(grew, 3)
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 3
    assert sum(b.compute_infer.count for b in after.batch_stats if b.batch_size == 2) >= 3


def test_repository_index_lists_versions(stub):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "1", "READY")]


# --- clients nobody here wrote ------------------------------------------------------------

TRITONCLIENT_CHECKS = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, pixels_file, embeddings_file = sys.argv[1:]
client = tc.InferenceServerClient(target)
pixels = np.load(pixels_file)
report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
          "model_ready": client.is_model_ready("digits"),
          "metadata": client.get_model_metadata("digits", as_json=True),
          "config": client.get_model_config("digits", as_json=True)["config"]}

def infer(array, datatype="FP32", model="digits", version=""):
    tensor = tc.InferInput("pixels", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor], model_version=version,
                        outputs=[tc.InferRequestedOutput("embedding")])

np.save(embeddings_file, infer(pixels).as_numpy("embedding"))
report["errors"] = {}
for case, call in {
        "unknown model": lambda: infer(pixels, model="nope"),
        "unknown version": lambda: infer(pixels, version="7"),
        "wrong shape": lambda: infer(pixels[:, :, :, :7].copy()),
        "wrong datatype": lambda: infer(pixels.astype(np.int32), datatype="INT32")}.items():
    try:
        call()
        report["errors"][case] = ["OK", ""]
    except InferenceServerException as exc:
        report["errors"][case] = [exc.status(), exc.message()]

streamed = []
client.start_stream(callback=lambda result, error: streamed.append(
    (result.get_response().id, result.as_numpy("embedding").tolist()) if error is None
    else ("error", str(error))))
for i in range(3):
    tensor = tc.InferInput("pixels", [1, *pixels.shape[1:]], "FP32")
    tensor.set_data_from_numpy(pixels[i:i + 1])
    client.async_stream_infer("digits", [tensor], request_id=f"s{i}")
client.stop_stream()
report["streamed"] = streamed
print(json.dumps(report))
"""


def run_tritonclient(target: str, pixels: np.ndarray, folder: Path) -> tuple[dict, np.ndarray]:
    if importlib.util.find_spec("tritonclient") is None:  # never imported here: see above
        pytest.skip(
            "tritonclient missing: pip install --no-deps tritonclient==2.51.0 python-rapidjson"
        )
    np.save(folder / "pixels.npy", pixels)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITONCLIENT_CHECKS,
            target,
            str(folder / "pixels.npy"),
            str(folder / "embeddings.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), np.load(folder / "embeddings.npy")


def test_tritonclient_metadata_config_infer_stream_and_errors(server, tmp_path):
    pixels = digits_pixels(6, seed=5)
    report, embeddings = run_tritonclient(server.target, pixels, tmp_path)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "shape": ["-1", *map(str, ROW_SHAPE)]}
    ]
    assert report["config"]["max_batch_size"] == 32
    assert report["config"]["input"][0]["data_type"] == "TYPE_FP32"
    np.testing.assert_allclose(embeddings, expected_embeddings(pixels, SEED), rtol=1e-5, atol=1e-5)
    errors = report["errors"]
    assert errors["unknown model"][0] == "StatusCode.NOT_FOUND"
    assert "got 'nope'" in errors["unknown model"][1]
    assert errors["unknown version"][0] == "StatusCode.NOT_FOUND"
    assert errors["wrong shape"][0] == "StatusCode.INVALID_ARGUMENT"
    assert (
        "inputs[pixels].shape: expected [batch, 1, 8, 8], got [6, 1, 8, 7]"
        in (errors["wrong shape"][1])
    )
    assert errors["wrong datatype"] == [
        "StatusCode.INVALID_ARGUMENT",
        "inputs[pixels].datatype: expected FP32 or UINT8, got 'INT32'",
    ]
    assert [entry[0] for entry in report["streamed"]] == ["s0", "s1", "s2"]
    np.testing.assert_allclose(
        [entry[1][0] for entry in report["streamed"]],
        expected_embeddings(pixels[:3], SEED),
        rtol=1e-5,
        atol=1e-5,
    )


def perf_analyzer_environment() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment it runs in; skip naming what is missing."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        pytest.skip(f"{binary} missing: pip install tritonclient==2.51.0 (test extra)")
    if ctypes.util.find_library("b64") is None:
        pytest.skip("libb64.so.0d missing: apt-get install libb64-0d")
    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    if not (cudart / "libcudart.so.12").exists():
        pytest.skip(f"{cudart}/libcudart.so.12 missing: pip install nvidia-cuda-runtime-cu12")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(cudart), env.get("LD_LIBRARY_PATH", "")])
    )
    return binary, env


def test_perf_analyzer_concurrency_sweep_completes(server, tmp_path):
    binary, env = perf_analyzer_environment()
    before = server.metrics.version(MODEL, 1).snapshot()
    results = tmp_path / "perf.csv"
    # Zeros, not perf_analyzer's default random bytes: those hold NaN/Inf, which this server
    # rejects as INVALID_ARGUMENT. Count windows keep the run short on a busy machine.
    done = subprocess.run(
        [
            str(binary),
            "-m",
            MODEL,
            "-u",
            server.target,
            "-i",
            "grpc",
            "-b",
            "2",
            "--concurrency-range",
            "1:4:3",
            "--input-data",
            "zero",
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            "40",
            "--stability-percentage",
            "999",
            "--max-trials",
            "3",
            "-f",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with results.open() as handle:
        rows = list(csv.DictReader(handle))
    # the CSV need not list the levels in sweep order (seen on a busy machine: 4 before 1)
    assert sorted((row["Concurrency"] for row in rows), key=int) == ["1", "4"]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    after = server.metrics.version(MODEL, 1).snapshot()
    served = after.success.count - before.success.count
    assert served >= 2 * 3 * 40  # two concurrency levels, at least three windows of 40 each
    assert after.fail.count == before.fail.count
    assert after.inference_count - before.inference_count == 2 * served
