"""A catalogue of bad requests across both gRPC APIs, sent while good traffic runs beside them.

Each case must get its status code and a message naming the field; good requests sent at the
same time must all succeed with the right embeddings. Then overload: RESOURCE_EXHAUSTED for
what does not fit the queue, and every accepted request answered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from kserve_harness import (
    MODEL,
    ROW_SHAPE,
    BatchGate,
    SteadyTraffic,
    add_version,
    digits_pixels,
    expected_embeddings,
    kserve_stub,
    start_kserve_server,
)

from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto import grpc_service_pb2 as pb
from aet.proto.codec import encode_tensor

SEED = 11
MAX_REQUEST_ROWS = 16
TOKEN = "catalogue-token-42"
AUTH = [("authorization", f"Bearer {TOKEN}")]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PIXELS = digits_pixels(2, seed=4)


def kserve(
    pixels: np.ndarray = PIXELS, datatype: str = "FP32", shape=None, raw=None, **fields
) -> pb.ModelInferRequest:
    """A ModelInfer request for MODEL, raw bytes unless `raw` says otherwise."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="pixels", datatype=datatype, shape=pixels.shape if shape is None else shape
    )
    request = pb.ModelInferRequest(inputs=[tensor], **{"model_name": MODEL, **fields})
    if raw is None:
        raw = [pixels.tobytes()]
    request.raw_input_contents.extend(raw)
    return request


def typed(datatype: str, **contents) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="pixels",
                datatype=datatype,
                shape=[1, *ROW_SHAPE],
                contents=pb.InferTensorContents(**contents),
            )
        ],
    )


def with_parameter(request: pb.ModelInferRequest, key: str, **value) -> pb.ModelInferRequest:
    request.parameters[key].CopyFrom(pb.InferParameter(**value))
    return request


def embed(pixels: np.ndarray = PIXELS, **fields) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(inputs=encode_tensor(pixels), **{"model": MODEL, **fields})


def nan_at(row: int) -> np.ndarray:
    pixels = PIXELS.copy()
    pixels[row, 0, 3, 3] = np.nan
    return pixels


@dataclass(frozen=True)
class Case:
    api: str  # "kserve" or "embed": which stub method gets the request
    request: Callable[[], object]
    code: grpc.StatusCode
    fragment: str  # must appear in the status message: names the field and what was wrong
    metadata: tuple = tuple(AUTH)


CATALOGUE = {
    # KServe v2 ModelInfer
    "kserve unknown model": Case(
        "kserve",
        lambda: kserve(model_name="nope"),
        NOT_FOUND,
        "model: expected one of ['digits'], got 'nope'",
    ),
    "kserve unknown version": Case(
        "kserve", lambda: kserve(model_version="9"), NOT_FOUND, "has versions [1], got 9"
    ),
    "kserve malformed version": Case(
        "kserve",
        lambda: kserve(model_version="v1"),
        INVALID,
        "model_version: expected a positive integer",
    ),
    "kserve no input": Case(
        "kserve",
        lambda: pb.ModelInferRequest(model_name=MODEL),
        INVALID,
        "inputs: expected 1 tensor ('pixels'), got 0",
    ),
    "kserve two inputs": Case(
        "kserve",
        lambda: pb.ModelInferRequest(
            model_name=MODEL, inputs=[kserve().inputs[0]] * 2, raw_input_contents=[b""] * 2
        ),
        INVALID,
        "inputs: expected 1 tensor ('pixels'), got 2",
    ),
    "kserve wrong input name": Case(
        "kserve",
        lambda: pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="image", datatype="FP32", shape=PIXELS.shape
                )
            ],
            raw_input_contents=[PIXELS.tobytes()],
        ),
        INVALID,
        "inputs[0].name: expected 'pixels', got 'image'",
    ),
    "kserve wrong datatype": Case(
        "kserve",
        lambda: kserve(PIXELS.astype("<f8"), "FP64"),
        INVALID,
        "inputs[pixels].datatype: expected FP32 or UINT8, got 'FP64'",
    ),
    "kserve unknown datatype": Case(
        "kserve",
        lambda: kserve(datatype="FLOAT"),
        INVALID,
        "inputs[pixels].datatype: expected FP32 or UINT8, got 'FLOAT'",
    ),
    "kserve wrong shape": Case(
        "kserve",
        lambda: kserve(shape=[2, 1, 4, 16]),
        INVALID,
        "inputs[pixels].shape: expected [batch, 1, 8, 8], got [2, 1, 4, 16]",
    ),
    "kserve negative dimension": Case(
        "kserve",
        lambda: kserve(shape=[-2, 1, 8, 8]),
        INVALID,
        "inputs[pixels].shape: expected at least one dimension, none negative, got [-2, 1, 8, 8]",
    ),
    "kserve byte length": Case(
        "kserve",
        lambda: kserve(raw=[PIXELS.tobytes()[:-4]]),
        INVALID,
        "inputs[pixels].data: expected 512 bytes for shape [2, 1, 8, 8] of float32, got 508 bytes",
    ),
    "kserve NaN": Case(
        "kserve",
        lambda: kserve(nan_at(1)),
        INVALID,
        "inputs[pixels].data: expected finite values, got NaN or Inf in row 1",
    ),
    "kserve Inf": Case(
        "kserve",
        lambda: kserve(np.full_like(PIXELS, np.inf)),
        INVALID,
        "inputs[pixels].data: expected finite values, got NaN or Inf in row 0",
    ),
    "kserve empty batch": Case(
        "kserve",
        lambda: kserve(PIXELS[:0]),
        INVALID,
        "inputs[pixels].shape[0]: expected at least 1 row, got 0",
    ),
    "kserve oversize batch": Case(
        "kserve",
        lambda: kserve(digits_pixels(MAX_REQUEST_ROWS + 1)),
        INVALID,
        "inputs[pixels].shape[0]: expected at most 16 rows per request, got 17",
    ),
    "kserve raw entries": Case(
        "kserve",
        lambda: kserve(raw=[PIXELS.tobytes()] * 2),
        INVALID,
        "raw_input_contents: expected 1 entry (one per input), got 2",
    ),
    "kserve raw and typed": Case(
        "kserve",
        lambda: pb.ModelInferRequest(
            model_name=MODEL,
            raw_input_contents=[PIXELS.tobytes()],
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="pixels",
                    datatype="FP32",
                    shape=PIXELS.shape,
                    contents=pb.InferTensorContents(fp32_contents=PIXELS.ravel()),
                )
            ],
        ),
        INVALID,
        "inputs[pixels].contents: expected it empty when raw_input_contents is given",
    ),
    "kserve typed count": Case(
        "kserve",
        lambda: typed("FP32", fp32_contents=[1.0] * 63),
        INVALID,
        "inputs[pixels].contents.fp32_contents: expected 64 values for shape [1, 1, 8, 8], got 63",
    ),
    "kserve typed field": Case(
        "kserve",
        lambda: typed("FP32", int_contents=[1] * 64),
        INVALID,
        "inputs[pixels].contents: expected fp32_contents for FP32 (or "
        "raw_input_contents), got int_contents",
    ),
    "kserve typed UINT8 range": Case(
        "kserve",
        lambda: typed("UINT8", uint_contents=[300] * 64),
        INVALID,
        "inputs[pixels].contents.uint_contents: expected UINT8 values 0..255, got 300",
    ),
    "kserve unknown output": Case(
        "kserve",
        lambda: kserve(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
        INVALID,
        "outputs[0].name: expected 'embedding', got 'logits'",
    ),
    "kserve classification": Case(
        "kserve",
        lambda: kserve(
            outputs=[
                pb.ModelInferRequest.InferRequestedOutputTensor(
                    name="embedding",
                    parameters={"classification": pb.InferParameter(int64_param=3)},
                )
            ]
        ),
        INVALID,
        "outputs[0].parameters['classification']: expected absent",
    ),
    "kserve timeout type": Case(
        "kserve",
        lambda: with_parameter(kserve(), "timeout", string_param="soon"),
        INVALID,
        "parameters['timeout']: expected int64_param, got string_param",
    ),
    "kserve negative timeout": Case(
        "kserve",
        lambda: with_parameter(kserve(), "timeout", int64_param=-5),
        INVALID,
        "parameters['timeout']: expected microseconds >= 0, got -5",
    ),
    "kserve sequence parameter": Case(
        "kserve",
        lambda: with_parameter(kserve(), "sequence_id", int64_param=7),
        INVALID,
        "parameters['sequence_id']: expected absent (models here are not stateful",
    ),
    "kserve missing token": Case(
        "kserve",
        kserve,
        grpc.StatusCode.UNAUTHENTICATED,
        "missing metadata 'authorization'",
        metadata=(),
    ),
    "kserve wrong token": Case(
        "kserve",
        kserve,
        grpc.StatusCode.UNAUTHENTICATED,
        "not one of the server's tokens",
        metadata=(("authorization", "Bearer guess"),),
    ),
    # aet.v1.EmbeddingService Embed
    "embed unknown model": Case(
        "embed",
        lambda: embed(model="nope"),
        NOT_FOUND,
        "model: expected one of ['digits'], got 'nope'",
    ),
    "embed unknown version": Case(
        "embed", lambda: embed(version=4), NOT_FOUND, "has versions [1], got 4"
    ),
    "embed unspecified dtype": Case(
        "embed",
        lambda: embedding_pb2.EmbedRequest(
            model=MODEL, inputs=embedding_pb2.Tensor(shape=PIXELS.shape, data=PIXELS.tobytes())
        ),
        INVALID,
        "inputs.dtype: expected one of FLOAT32, UINT8, FLOAT16, got DATA_TYPE_UNSPECIFIED",
    ),
    "embed float16 input": Case(
        "embed",
        lambda: embed(PIXELS.astype(np.float16)),
        INVALID,
        "inputs.dtype: expected float32 or uint8, got float16",
    ),
    "embed wrong shape": Case(
        "embed",
        lambda: embed(PIXELS.reshape(2, 1, 4, 16)),
        INVALID,
        "inputs.shape: expected [batch, 1, 8, 8], got [2, 1, 4, 16]",
    ),
    "embed byte length": Case(
        "embed",
        lambda: embedding_pb2.EmbedRequest(
            model=MODEL,
            inputs=embedding_pb2.Tensor(
                dtype=embedding_pb2.FLOAT32, shape=[3, 1, 8, 8], data=PIXELS.tobytes()
            ),
        ),
        INVALID,
        "inputs.data: expected 768 bytes for shape [3, 1, 8, 8] of float32, got 512 bytes",
    ),
    "embed NaN": Case(
        "embed",
        lambda: embed(nan_at(0)),
        INVALID,
        "inputs.data: expected finite values, got NaN or Inf in row 0",
    ),
    "embed empty batch": Case(
        "embed",
        lambda: embed(PIXELS[:0]),
        INVALID,
        "inputs.shape[0]: expected at least 1 row, got 0",
    ),
    "embed oversize batch": Case(
        "embed",
        lambda: embed(digits_pixels(MAX_REQUEST_ROWS + 1)),
        INVALID,
        "inputs.shape[0]: expected at most 16 rows per request, got 17",
    ),
    "embed missing token": Case(
        "embed",
        embed,
        grpc.StatusCode.UNAUTHENTICATED,
        "missing metadata 'authorization'",
        metadata=(),
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    add_version(repository, SEED)
    live = start_kserve_server(
        repository, tokens=(TOKEN,), max_batch_size=8, max_request_rows=MAX_REQUEST_ROWS
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def traffic(channel):
    with SteadyTraffic(channel, seed_of_version={1: SEED}, metadata=AUTH) as running:
        yield running


@pytest.mark.parametrize("name", CATALOGUE)
def test_bad_request_gets_its_status_and_names_the_field(channel, traffic, name):
    case = CATALOGUE[name]
    call = (
        kserve_stub(channel).ModelInfer
        if case.api == "kserve"
        else embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(case.request(), metadata=case.metadata, timeout=30)
    assert caught.value.code() == case.code, caught.value.details()
    assert case.fragment in caught.value.details()


def test_catalogue_is_large_and_spans_both_apis():
    assert len(CATALOGUE) >= 25
    assert {case.api for case in CATALOGUE.values()} == {"kserve", "embed"}


def test_good_requests_beside_the_bad_ones_all_succeeded(traffic):
    assert traffic.failures == []
    assert traffic.answered > 0


def test_overload_is_resource_exhausted_and_accepted_work_completes(tmp_path):
    """max_batch_size 1 and a queue of 1: a 1,000-row request occupies the queue while it is
    cut into 1,000 runs, so every request arriving meanwhile is refused, on either API."""
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, max_batch_size=1, max_queue_size=1, max_request_rows=1000)
    gate = BatchGate(live.registry.lookup(MODEL))
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub, embedder = kserve_stub(channel), embedding_pb2_grpc.EmbeddingServiceStub(channel)
            big = digits_pixels(1000, seed=9)
            future = stub.ModelInfer.future(kserve(big), timeout=120)
            gate.wait_entered()  # its first row ran; the rest holds the one queue place
            refused = []
            for call, request in [(stub.ModelInfer, kserve()), (embedder.Embed, embed())] * 3:
                try:
                    call(request, timeout=30)
                    refused.append(None)
                except grpc.RpcError as exc:
                    refused.append((exc.code(), exc.details()))
            gate.open()
            answer = future.result()
            assert all(
                r is not None
                and r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "queue full (1 requests waiting); retry later" in r[1]
                for r in refused
            ), refused
            np.testing.assert_allclose(
                np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(1000, -1),
                expected_embeddings(big, SEED),
                rtol=1e-5,
                atol=1e-5,
            )
            assert stub.ModelInfer(kserve(), timeout=30).raw_output_contents  # free again
        snapshot = live.metrics.version(MODEL, 1).snapshot()
        # 6 refusals (3 per API): both APIs record per version through the one pipeline
        assert (snapshot.success.count, snapshot.fail.count) == (2, 6)
        assert snapshot.execution_count == 1000 + len(PIXELS)  # one row per run
    finally:
        gate.open()
        live.stop()
