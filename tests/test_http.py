"""The KServe v2 REST front end (`aet serve --http-port`) on real servers on 127.0.0.1.

One repository holds every kind of model the server ships: the shipped digits encoder (with
`reconstruction_error` and, calibrated, `p_value`), a tiny encoder without a score, and a tiny
classifier (Triton's classification extension). `tritonclient.http` (binary tensors and
`binary_data=False`, plain, gzip and deflate) and a plain JSON request (what curl sends) must
give what `tritonclient.grpc` gets, within 1e-6. Every bad input is answered by name with its
HTTP status, and the server answers the next request.
"""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import socket
import ssl
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import start_app
from kserve_harness import ADMIN_TOKEN, BatchGate, add_version, digits_pixels
from onnx import TensorProto, helper, numpy_helper

from aet.repository import ClassifierSpec, InputSpec, ModelCard, OutputSpec, write_version

tritonclient_http = pytest.importorskip("tritonclient.http", reason="pip install tritonclient")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("cat", "dog", "owl")
LIMIT_MB = 1
TOKEN = "s3cret-token"
# Every model and the outputs (name, class count) a request may ask of it.
CASES = {
    "digits": [("embedding", 0), ("reconstruction_error", 0), ("p_value", 0)],
    "linear": [("embedding", 0)],
    "classes": [("probabilities", 0), ("probabilities", 2)],
}


def classifier_onnx() -> bytes:
    """pixels (batch, 1, 8, 8) -> softmax(flatten(pixels / 16) @ W): 3 classes."""
    weights = np.random.default_rng(7).standard_normal((64, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["pixels", "raw_max"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.array(16.0, np.float32), "raw_max"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-repository")
    shutil.copytree(ROOT / "exported" / "digits", root / "digits")
    add_version(root, 3, name="linear")
    card = ModelCard.draft(
        "classes",
        "classifier",
        InputSpec("pixels", (1, 8, 8), "float32", (0.0, 16.0)),
        OutputSpec("probabilities", "float32", len(LABELS)),
        dataset={"name": "digits"},
        opset=17,
        library_versions={"onnx": onnx.__version__},
        classifier=ClassifierSpec(
            LABELS, {"name": "linear", "version": 1, "sha256": "0" * 64}, "logreg", {}
        ),
    )
    write_version(root, "classes", classifier_onnx(), card)
    return root


@pytest.fixture(scope="module")
def app(repository):
    live = start_app(repository, http_port=0, max_message_mb=LIMIT_MB, max_batch_size=8)
    yield live
    live.stop(grace_period=1.0)


@pytest.fixture(scope="module")
def clients(app):
    http_client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{app.http_port}")
    grpc_client = tritonclient_grpc.InferenceServerClient(app.target)
    yield http_client, grpc_client
    http_client.close()
    grpc_client.close()


def request(
    app, method: str, path: str, body: bytes | dict | None = None, headers=None, port=None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (what curl sends): status, headers (lower case), body."""
    connection = http.client.HTTPConnection("127.0.0.1", port or app.http_port, timeout=30)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


def json_request(pixels: np.ndarray, outputs=None, **fields) -> dict:
    """A v2 inference request with the pixels as nested JSON lists."""
    body = {
        **fields,
        "inputs": [
            {
                "name": "pixels",
                "datatype": "FP32",
                "shape": list(pixels.shape),
                "data": pixels.tolist(),
            }
        ],
    }
    if outputs is not None:
        body["outputs"] = outputs
    return body


def grpc_results(grpc_client, model: str, pixels: np.ndarray, outputs) -> dict[str, np.ndarray]:
    tensor = tritonclient_grpc.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    asked = [tritonclient_grpc.InferRequestedOutput(n, class_count=k) for n, k in outputs]
    result = grpc_client.infer(model, [tensor], outputs=asked)
    return {n: result.as_numpy(n) for n, _ in dict.fromkeys(outputs)}


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == object:  # classification strings (bytes when binary, str from JSON)
        text = np.vectorize(lambda e: e.decode() if isinstance(e, bytes) else e, otypes=[object])
        assert text(got).tolist() == text(want).tolist()
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# --- health, metadata, configuration, statistics ---------------------------------------------


def test_health_and_server_metadata(app, clients):
    http_client, _ = clients
    assert http_client.is_server_live() and http_client.is_server_ready()
    status, headers, body = request(app, "GET", "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    assert headers["content-type"] == "application/json"
    metadata = http_client.get_server_metadata()
    assert metadata["name"] == "ae-transfer"
    assert "binary_tensor_data" in metadata["extensions"]
    assert "classification" in metadata["extensions"]


def test_model_metadata_ready_and_config_match_grpc(app, clients):
    http_client, grpc_client = clients
    for model in CASES:
        metadata = http_client.get_model_metadata(model)
        over_grpc = grpc_client.get_model_metadata(model, as_json=True)
        assert metadata["name"] == model and metadata["versions"] == over_grpc["versions"]
        for side in ("inputs", "outputs"):
            assert metadata[side] == [  # gRPC's JSON prints int64 shapes as strings
                {**t, "shape": [int(d) for d in t["shape"]]} for t in over_grpc[side]
            ]
        assert http_client.is_model_ready(model)
        assert http_client.is_model_ready(model, model_version="1")
        config = http_client.get_model_config(model)
        grpc_config = grpc_client.get_model_config(model, as_json=True)["config"]
        assert config["max_batch_size"] == grpc_config["max_batch_size"] == 16384
        assert config["input"][0]["dims"] == [1, 8, 8]
        assert config["dynamic_batching"]["preferred_batch_size"] == [8]
    names = [o["name"] for o in http_client.get_model_metadata("digits")["outputs"]]
    assert names == ["embedding", "reconstruction_error", "p_value"]
    status, _, body = request(app, "GET", "/v2/models/digits/versions/1")
    assert status == 200 and json.loads(body)["name"] == "digits"


def test_statistics_count_http_requests(app, clients):
    http_client, _ = clients

    def successes() -> int:
        (stats,) = http_client.get_inference_statistics("linear")["model_stats"]
        return stats["inference_stats"]["success"]["count"]

    labels = {"model": "linear", "version": "1", "api": "http", "outcome": "success"}

    def counted() -> float:
        return app.metrics.registry.get_sample_value("aet_requests_total", labels) or 0.0

    before, before_counted = successes(), counted()
    for rows in (1, 2, 3):
        request(app, "POST", "/v2/models/linear/infer", json_request(digits_pixels(rows)))
    assert successes() == before + 3
    assert counted() == before_counted + 3  # Prometheus, under api="http"
    every = http_client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} == set(CASES)
    assert all(isinstance(s["inference_count"], int) for s in every)


# --- inference: every model, every client, the same numbers ---------------------------------


@pytest.mark.parametrize("model", sorted(CASES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_http_equals_grpc(clients, model, binary, compression):
    http_client, grpc_client = clients
    pixels = digits_pixels(5, seed=11)
    for name, count in CASES[model]:  # one output per request: a class count names its output
        want = grpc_results(grpc_client, model, pixels, [(name, count)])[name]
        tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        asked = tritonclient_http.InferRequestedOutput(name, binary_data=binary, class_count=count)
        result = http_client.infer(
            model,
            [tensor],
            outputs=[asked],
            request_id=f"{model}-{name}",
            request_compression_algorithm=compression,
            response_compression_algorithm=compression,
        )
        assert result.get_response()["id"] == f"{model}-{name}"
        assert_same(result.as_numpy(name), want)
        if count:
            first = result.as_numpy(name)[0, 0]
            assert (first.decode() if binary else first).count(":") == 2  # score:index:label


def test_all_outputs_in_one_request_in_the_asked_order(clients):
    http_client, grpc_client = clients
    pixels = digits_pixels(4, seed=2)
    outputs = [("p_value", 0), ("embedding", 0), ("reconstruction_error", 0)]
    want = grpc_results(grpc_client, "digits", pixels, outputs)
    tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    asked = [
        tritonclient_http.InferRequestedOutput(n, binary_data=n != "p_value") for n, _ in outputs
    ]
    result = http_client.infer("digits", [tensor], outputs=asked)
    assert [o["name"] for o in result.get_response()["outputs"]] == [n for n, _ in outputs]
    for name, _ in outputs:
        assert_same(result.as_numpy(name), want[name])


def test_no_outputs_named_gets_the_embedding_in_binary(clients):
    http_client, grpc_client = clients
    pixels = digits_pixels(3, seed=4)
    tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = http_client.infer("digits", [tensor])  # sends binary_data_output: true
    (output,) = result.get_response()["outputs"]
    assert output["name"] == "embedding" and "binary_data_size" in output["parameters"]
    want = grpc_results(grpc_client, "digits", pixels, [("embedding", 0)])["embedding"]
    assert_same(result.as_numpy("embedding"), want)


def test_curl_json_request_nested_or_flat(app, clients):
    _, grpc_client = clients
    pixels = digits_pixels(2, seed=9)
    want = grpc_results(grpc_client, "digits", pixels, [("embedding", 0), ("p_value", 0)])
    outputs = [{"name": "embedding"}, {"name": "p_value"}]
    nested = json_request(pixels, outputs, id="curl-1")
    flat = json_request(pixels, outputs)
    flat["inputs"][0]["data"] = pixels.ravel().tolist()
    for body in (nested, flat):
        status, headers, raw = request(app, "POST", "/v2/models/digits/infer", body)
        assert status == 200 and "inference-header-content-length" not in headers
        answer = json.loads(raw)
        assert (answer["model_name"], answer["model_version"]) == ("digits", "1")
        assert answer.get("id") == body.get("id")
        for output in answer["outputs"]:
            got = np.array(output["data"], np.float32).reshape(output["shape"])
            assert_same(got, want[output["name"]])


def test_uint8_json_and_classification_as_json_strings(app, clients):
    _, grpc_client = clients
    pixels = np.round(digits_pixels(2, seed=3))
    body = json_request(pixels, [{"name": "probabilities", "parameters": {"classification": 3}}])
    body["inputs"][0].update(datatype="UINT8", data=pixels.astype(int).ravel().tolist())
    status, _, raw = request(app, "POST", "/v2/models/classes/infer", body)
    assert status == 200, raw
    (output,) = json.loads(raw)["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 3])
    want = grpc_results(grpc_client, "classes", pixels, [("probabilities", 3)])
    assert output["data"] == [s.decode() for s in want["probabilities"].ravel()]
    assert {s.rsplit(":", 1)[1] for s in output["data"]} == set(LABELS)


def test_gzip_response_when_accepted(app):
    body = json.dumps(json_request(digits_pixels(2))).encode()
    status, headers, raw = request(
        app,
        "POST",
        "/v2/models/linear/infer",
        gzip.compress(body),
        {"Content-Encoding": "gzip", "Accept-Encoding": "br;q=1, gzip;q=0.5"},
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["outputs"][0]["shape"] == [2, 4]


def test_concurrent_http_requests_are_batched_together(app):
    """Requests wait for their batch in worker threads, not on the event loop: four sent while
    the model is held in a batch run as one batch after it."""
    model = app.registry.lookup("linear")
    gate = BatchGate(model)
    before = model.batcher.stats.batches
    first = threading.Thread(
        target=request,
        args=(app, "POST", "/v2/models/linear/infer", json_request(digits_pixels(1))),
    )
    first.start()
    gate.wait_entered()
    answers: list[int] = []
    senders = [
        threading.Thread(
            target=lambda: answers.append(
                request(app, "POST", "/v2/models/linear/infer", json_request(digits_pixels(1)))[0]
            )
        )
        for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    while model.batcher.queued_requests < 4:  # all four are in the queue behind the gate
        threading.Event().wait(0.005)
    gate.open()
    for thread in [first, *senders]:
        thread.join(30)
    assert answers == [200] * 4
    assert model.batcher.stats.batches - before == 2  # the held one, then the four together


# --- bad input, answered by name --------------------------------------------------------------


def binary_body(pixels: np.ndarray, extra: bytes = b"", cut: int = 0) -> tuple[bytes, dict]:
    raw = pixels.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    body = header + raw[: len(raw) - cut] + extra
    return body, {"Inference-Header-Content-Length": str(len(header))}


PIXELS = digits_pixels(2, seed=1)
TOO_BIG = LIMIT_MB * 2**20 + 1
BAD_REQUESTS = {
    "malformed JSON": (
        "digits",
        b'{"inputs": [',
        {},
        400,
        "body: expected a JSON object, got invalid JSON (Expecting value at line 1 column 13)",
    ),
    "JSON not an object": ("digits", b"[1, 2]", {}, 400, "body: expected a JSON object, got a"),
    "header length not a number": (
        "digits",
        binary_body(PIXELS)[0],
        {"Inference-Header-Content-Length": "abc"},
        400,
        "Inference-Header-Content-Length: expected the JSON header's length in bytes, 1 to",
    ),
    "header length past the body": (
        "digits",
        binary_body(PIXELS)[0],
        {"Inference-Header-Content-Length": "99999"},
        400,
        "(the body's length), got '99999'",
    ),
    "header length cuts the JSON": (
        "digits",
        binary_body(PIXELS)[0],
        {"Inference-Header-Content-Length": "20"},
        400,
        "body[:Inference-Header-Content-Length] (20 bytes): expected a JSON object, got invalid",
    ),
    "binary section shorter than declared": (
        "digits",
        *binary_body(PIXELS, cut=4),
        400,
        "binary data: expected 512 bytes after the JSON header (the sum of the inputs' "
        "parameters.binary_data_size), got 508",
    ),
    "binary section longer than declared": (
        "digits",
        *binary_body(PIXELS, extra=b"1234"),
        400,
        "binary data: expected 512 bytes after the JSON header",
    ),
    "binary without the header": (
        "digits",
        binary_body(PIXELS)[0],
        {},
        400,
        "body: expected a JSON object, got invalid JSON",
    ),
    "shape not matching the data": (
        "digits",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [3, 1, 8, 8],
                        "data": PIXELS.tolist(),
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "inputs[pixels].data: expected 192 values for shape [3, 1, 8, 8], got 128",
    ),
    "shape not the model's": (
        "digits",
        json.dumps(json_request(PIXELS[:, :, :, :7])).encode(),
        {},
        400,
        "inputs[pixels].shape: expected [batch, 1, 8, 8], got [2, 1, 8, 7]",
    ),
    "ragged data": (
        "digits",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": [[1.0] * 32, [1.0] * 31],
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "inputs[pixels].data: expected numbers as a flat or evenly nested list, got [[1.0",
    ),
    "strings as data": (
        "linear",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": ["x"] * 64,
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "inputs[pixels].data: expected numbers as a flat or evenly nested list, got ['x'",
    ),
    "NaN in JSON": (
        "linear",
        json.dumps(json_request(np.full((1, 1, 8, 8), np.nan, np.float32))).encode(),
        {},
        400,
        "inputs[pixels].data: expected finite values, got NaN or Inf in row 0",
    ),
    "wrong datatype": (
        "linear",
        json.dumps(
            {"inputs": [{**json_request(PIXELS)["inputs"][0], "datatype": "INT32"}]}
        ).encode(),
        {},
        400,
        "inputs[pixels].datatype: expected FP32 or UINT8, got 'INT32'",
    ),
    "unknown model": ("nope", json.dumps(json_request(PIXELS)).encode(), {}, 404, "got 'nope'"),
    "unknown output": (
        "digits",
        json.dumps(json_request(PIXELS, [{"name": "error"}])).encode(),
        {},
        400,
        "outputs[0].name: expected 'embedding' or 'reconstruction_error' or 'p_value', got 'error'",
    ),
    "p_value of an uncalibrated model": (
        "linear",
        json.dumps(json_request(PIXELS, [{"name": "p_value"}])).encode(),
        {},
        400,
        "outputs[0].name: model 'linear' version 1 has no p_value output",
    ),
    "classification of an encoder": (
        "linear",
        json.dumps(
            json_request(PIXELS, [{"name": "embedding", "parameters": {"classification": 2}}])
        ).encode(),
        {},
        400,
        "outputs[0].parameters['classification']: expected a classifier model",
    ),
    "class count over the classes": (
        "classes",
        json.dumps(
            json_request(PIXELS, [{"name": "probabilities", "parameters": {"classification": 4}}])
        ).encode(),
        {},
        400,
        "outputs[0].parameters['classification'] (class_count): expected 1 to 3 (the classes), "
        "got 4",
    ),
    "negative timeout": (
        "linear",
        json.dumps(json_request(PIXELS, parameters={"timeout": -1})).encode(),
        {},
        400,
        "parameters['timeout']: expected microseconds >= 0, got -1",
    ),
    "body over the limit": ("linear", b" " * TOO_BIG, {}, 413, "body: expected at most 1048576"),
    "decompressed body over the limit": (
        "linear",
        gzip.compress(b" " * TOO_BIG),
        {"Content-Encoding": "gzip"},
        413,
        "body (gzip-decompressed): expected at most 1048576 bytes (--max-message-mb)",
    ),
    "bad gzip stream": (
        "linear",
        b"not gzip at all",
        {"Content-Encoding": "gzip"},
        400,
        "body: expected a gzip stream (Content-Encoding: gzip), got 15 bytes that do not",
    ),
    "truncated deflate stream": (
        "linear",
        zlib.compress(json.dumps(json_request(PIXELS)).encode())[:40],
        {"Content-Encoding": "deflate"},
        400,
        "body: expected a complete deflate stream (Content-Encoding: deflate), got 40 bytes",
    ),
    "unknown encoding": (
        "linear",
        b"{}",
        {"Content-Encoding": "br"},
        400,
        "Content-Encoding: expected gzip, deflate or identity, got 'br'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_answered_by_name_and_the_server_goes_on(app, case):
    model, body, headers, status, message = BAD_REQUESTS[case]
    got_status, got_headers, raw = request(app, "POST", f"/v2/models/{model}/infer", body, headers)
    assert got_status == status, raw
    assert got_headers["content-type"] == "application/json"
    assert message in json.loads(raw)["error"]
    good, _, _ = request(app, "POST", "/v2/models/linear/infer", json_request(PIXELS))
    assert good == 200


def test_unknown_paths_and_versions_are_named(app):
    status, _, raw = request(app, "GET", "/v2/models/digits/versions/7")
    assert status == 404 and "version: model 'digits' has versions [1], got 7" in raw.decode()
    status, _, raw = request(app, "GET", "/v2/models/digits/versions/x1/ready")
    assert status == 400 and "version: expected a positive integer" in raw.decode()
    status, _, raw = request(app, "GET", "/v3/models")
    assert status == 404 and "expected a KServe v2 path" in json.loads(raw)["error"]
    status, _, raw = request(app, "GET", "/v2/models/digits/infer")
    assert status == 405 and "HTTP status 405" in json.loads(raw)["error"]


# --- the repository extension -----------------------------------------------------------------


def test_repository_index_unload_and_load(repository, tmp_path):
    """Triton's repository extension, gated as over gRPC: model control and an admin token."""
    shutil.copytree(repository / "linear", tmp_path / "repository" / "linear")
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    live = start_app(
        tmp_path / "repository",
        http_port=0,
        model_control=True,
        admin_token_file=tmp_path / "admin",
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{live.http_port}")
        assert client.get_model_repository_index() == [
            {"name": "linear", "version": "1", "state": "READY", "reason": ""}
        ]
        for headers in ({}, {"Authorization": "Bearer not-an-admin"}):
            status, _, raw = request(
                live, "POST", "/v2/repository/models/linear/unload", b"", headers
            )
            assert status == 403 and "needs an admin token" in json.loads(raw)["error"]
        assert client.is_model_ready("linear")
        client.unload_model("linear", headers=admin)  # sends unload_dependents: accepted
        assert not client.is_model_ready("linear")
        assert not client.is_server_ready()
        status, _, raw = request(live, "POST", "/v2/repository/index", {"ready": True})
        assert (status, json.loads(raw)) == (200, [])
        status, _, _ = request(live, "POST", "/v2/repository/models/linear/load", b"", admin)
        assert status == 200 and client.is_model_ready("linear")
        status, _, raw = request(live, "POST", "/v2/repository/models/nope/load", b"", admin)
        assert status == 404 and "got 'nope'" in json.loads(raw)["error"]
        client.close()
    finally:
        live.stop(grace_period=1.0)


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds (it must, eventually); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_ready_fails_during_the_drain_while_infer_answers(repository):
    live = start_app(repository, http_port=0, drain_seconds=600)
    stopping = threading.Thread(target=live.stop, kwargs={"grace_period": 5.0})
    try:
        assert request(live, "GET", "/v2/health/ready")[0] == 200
        stopping.start()
        wait_for(lambda: request(live, "GET", "/v2/health/ready")[0] == 400)
        assert request(live, "GET", "/v2/health/live")[0] == 200
        status, headers, _ = request(
            live, "POST", "/v2/models/linear/infer", json_request(PIXELS), {"x-request-id": "d-1"}
        )
        assert status == 200 and headers["x-request-id"] == "d-1"
    finally:
        live.running.end_drain.set()
        if stopping.is_alive():
            stopping.join()


# --- tokens and TLS ---------------------------------------------------------------------------


def test_tokens_guard_everything_but_health(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    live = start_app(repository, http_port=0, token_file=tokens)
    try:
        infer = "/v2/models/linear/infer"
        assert request(live, "GET", "/v2/health/live")[0] == 200
        assert request(live, "GET", "/v2/health/ready")[0] == 200
        for headers, reason in (
            ({}, "missing metadata 'authorization'"),
            ({"Authorization": "Bearer wrong"}, "not one of the server's tokens"),
            ({"Authorization": TOKEN}, "expected the scheme 'Bearer <token>'"),
        ):
            for method, path in (("GET", "/v2/models/linear"), ("POST", infer)):
                body = json_request(PIXELS) if method == "POST" else None
                status, got_headers, raw = request(live, method, path, body, headers)
                assert status == 401 and reason in json.loads(raw)["error"]
                assert got_headers["www-authenticate"] == "Bearer"
                assert TOKEN not in raw.decode()
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        assert request(live, "POST", infer, json_request(PIXELS), authorized)[0] == 200
    finally:
        live.stop(grace_period=1.0)


def test_tls_with_client_certificates(repository, pki):
    live = start_app(
        repository,
        http_port=0,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    try:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", live.http_port, context=context, timeout=30
        )
        connection.request("GET", "/v2/models/linear")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["name"] == "linear"
        connection.close()
        bare = ssl.create_default_context(cafile=str(pki / "ca.pem"))  # no client certificate
        refused = http.client.HTTPSConnection("127.0.0.1", live.http_port, context=bare, timeout=30)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            refused.request("GET", "/v2/health/live")
            refused.getresponse()
        refused.close()
    finally:
        live.stop(grace_period=1.0)


def test_http_port_in_use_is_named(repository, app):
    from aet.errors import UserError

    with pytest.raises(UserError, match=f"http_port: cannot bind 127.0.0.1:{app.http_port}"):
        start_app(repository, http_port=app.http_port)


def test_answers_leave_without_waiting_for_a_delayed_ack(app):
    """asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it each
    keep-alive answer waited ~40 ms for the client's delayed ACK (perf_analyzer saw 44 ms)."""
    (listening,) = app.http.server.servers[0].sockets
    assert listening.proto == socket.IPPROTO_TCP


def test_full_queue_is_429_and_a_passed_timeout_504(repository, tmp_path):
    """Held in a batch (deterministically, `BatchGate`): the one queue slot taken by a request
    whose `parameters.timeout` (1 µs) passes while it waits, the next request finds the queue
    full."""
    shutil.copytree(repository / "linear", tmp_path / "linear")
    live = start_app(tmp_path, http_port=0, max_queue_size=1)
    model = live.registry.lookup("linear")
    gate = BatchGate(model)
    infer = "/v2/models/linear/infer"
    answers: dict[str, tuple[int, dict, bytes]] = {}

    def send(key: str, body: dict) -> None:
        answers[key] = request(live, "POST", infer, body)

    try:
        held = threading.Thread(target=send, args=("held", json_request(PIXELS)))
        held.start()
        gate.wait_entered()
        late = threading.Thread(
            target=send, args=("late", json_request(PIXELS, parameters={"timeout": 1}))
        )
        late.start()
        while model.batcher.queued_requests < 1:
            threading.Event().wait(0.005)
        status, _, raw = request(live, "POST", infer, json_request(PIXELS))
        assert status == 429 and "queue" in json.loads(raw)["error"]
        gate.open()
        held.join(30)
        late.join(30)
        assert answers["held"][0] == 200
        assert answers["late"][0] == 504, answers["late"]
        assert "deadline" in json.loads(answers["late"][2])["error"]
    finally:
        gate.open()
        live.stop(grace_period=1.0)


def test_chunked_body_over_the_limit_is_413(app):
    """Without a Content-Length the limit holds while the body streams in."""
    connection = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    # The limit exactly, then one byte: all of it is sent before the server answers.
    chunks = [b" " * 65536] * (LIMIT_MB * 16) + [b" "]
    try:
        connection.request(
            "POST", "/v2/models/linear/infer", body=iter(chunks), encode_chunked=True
        )
        response = connection.getresponse()
        assert response.status == 413
        assert "body: expected at most 1048576 bytes" in json.loads(response.read())["error"]
    finally:
        connection.close()
    assert request(app, "POST", "/v2/models/linear/infer", json_request(PIXELS))[0] == 200
