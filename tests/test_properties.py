"""Property tests (Hypothesis): the model card parser and the tensor request decoders answer any
input with their typed error or a valid result, never an unexpected exception.

Bounded and derandomized (a fixed seed), so that CI is deterministic and quick."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve_harness import ROW_SHAPE, add_version

from aet.proto import embedding_pb2
from aet.proto import grpc_service_pb2 as pb
from aet.proto.codec import TensorCodecError, decode_tensor
from aet.repository import InputSpec, ModelCard, OutputSpec, RepositoryError
from aet.server.errors import InvalidArgument
from aet.server.kserve_service import decode_input
from aet.server.models import LoadedModel, ModelRegistry
from aet.server.validation import validate_inputs

BOUNDED = settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

VALID_CARD = json.loads(
    json.dumps(
        ModelCard.draft(
            "digits",
            "mlp",
            InputSpec("pixels", (1, 8, 8), "float32", (0.0, 16.0)),
            OutputSpec("embedding", "float32", 8),
            dataset={"name": "digits"},
        ).to_dict()
    )
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the nested dicts of `value`."""
    if not isinstance(value, dict):
        return []
    return [
        p for key, item in value.items() for p in [(*prefix, key), *_paths(item, (*prefix, key))]
    ]


CARD_PATHS = _paths(VALID_CARD)


@st.composite
def mutated_cards(draw) -> Any:
    """The valid card with one to three fields replaced, removed or added, or any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    card = json.loads(json.dumps(VALID_CARD))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CARD_PATHS))
        parent = card
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "remove":
            parent.pop(path[-1], None)
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return card


@BOUNDED
@given(mutated_cards())
def test_the_card_parser_gives_a_card_or_a_repository_error(data):
    try:
        card = ModelCard.from_dict(data, source="m/1/model.json")
    except RepositoryError as exc:
        assert str(exc).startswith("m/1/model.json")
    else:
        assert isinstance(card, ModelCard)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    """A real loaded version of the tiny harness encoder (rows (1, 8, 8), uint8 or float32)."""
    root = tmp_path_factory.mktemp("repository")
    add_version(root, seed=3)
    registry = ModelRegistry()
    registry.load_repository(root)
    yield registry.lookup("digits")
    registry.close(timeout=5)


shapes = st.lists(st.integers(-2, 9), min_size=0, max_size=5) | st.just([2, *ROW_SHAPE])


def _check_decoded(array: np.ndarray) -> None:
    assert array.dtype == np.float32 and array.shape[1:] == ROW_SHAPE and len(array) >= 1
    assert np.isfinite(array).all()


@BOUNDED
@given(
    name=st.sampled_from(["pixels", "features", ""]),
    datatype=st.sampled_from(["FP32", "UINT8", "INT64", "FP16", "BYTES", "nonsense"]),
    shape=shapes,
    raw=st.none() | st.binary(max_size=600),
    values=st.lists(st.floats(allow_nan=True, width=32), max_size=130),
    uints=st.lists(st.integers(0, 2**32 - 1), max_size=130),
)
def test_kserve_decoding_gives_rows_or_invalid_argument(
    loaded, name, datatype, shape, raw, values, uints
):
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    request = pb.ModelInferRequest(model_name="digits", inputs=[tensor])
    if raw is not None:
        request.raw_input_contents.append(raw)
    elif datatype == "UINT8":
        request.inputs[0].contents.uint_contents.extend(uints)
    else:
        request.inputs[0].contents.fp32_contents.extend(values)
    try:
        array = decode_input(request, loaded)
    except (InvalidArgument, TensorCodecError):
        return
    _check_decoded(array)


@BOUNDED
@given(
    dtype=st.integers(0, 12),
    shape=shapes,
    data=st.binary(max_size=600),
)
def test_embed_decoding_gives_rows_or_a_typed_error(loaded, dtype, shape, data):
    tensor = embedding_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        array = validate_inputs(decode_tensor(tensor, "inputs"), loaded.request_spec)
    except (InvalidArgument, TensorCodecError):
        return
    _check_decoded(array)
