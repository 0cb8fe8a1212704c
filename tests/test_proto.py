"""The committed gRPC stubs match the .proto files; the tensor codec round-trips and checks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from grpc_tools import grpc_version
from packaging.requirements import Requirement

from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import TensorCodecError, decode_raw, decode_tensor, encode_tensor
from aet.proto.generate import PACKAGE_DIR, generate_stubs, proto_files, stub_names


def test_committed_stubs_match_the_proto_files(tmp_path):
    generated = generate_stubs(tmp_path)
    assert {p.name for p in generated} == {n for proto in proto_files() for n in stub_names(proto)}
    stale = [
        p.name
        for p in generated
        if not (PACKAGE_DIR / p.name).exists()
        or (PACKAGE_DIR / p.name).read_bytes() != p.read_bytes()
    ]
    committed_by = {
        p.name: re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", p.read_text()).group(1)
        for p in PACKAGE_DIR.glob("*_pb2_grpc.py")
    }
    assert not stale, (
        f"stubs out of date: {stale}. Regenerate with `python -m aet.proto.generate` and commit "
        f"them. Installed grpcio-tools: {grpc_version.VERSION}; committed stubs were generated "
        f"by grpcio-tools {committed_by}"
    )


def test_pyproject_pins_the_generator_of_the_stubs_and_requires_what_they_import_under():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements = {r.name: r.specifier for r in map(Requirement, listed)}
    stub = (PACKAGE_DIR / "embedding_pb2_grpc.py").read_text()
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub).group(1)
    gencode = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),",
        (PACKAGE_DIR / "embedding_pb2.py").read_text(),
    )
    protobuf_generated = ".".join(gencode.groups())
    assert str(requirements["grpcio-tools"]) == f"=={grpc_generated}"
    # The stubs raise at import under an older runtime: the floors are exactly theirs.
    assert f">={grpc_generated}" in str(requirements["grpcio"]).split(",")
    assert f">={protobuf_generated}" in str(requirements["protobuf"]).split(",")


def test_embedding_service_has_its_five_methods():
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "aet.v1.EmbeddingService"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Embed": (False, False),
        "EmbedStream": (True, True),
        "ListModels": (False, False),
        "DescribeModel": (False, False),
        "Classify": (False, False),
    }
    assert hasattr(embedding_pb2_grpc, "add_EmbeddingServiceServicer_to_server")


@pytest.mark.parametrize(
    "dtype, wire",
    [
        (np.float32, embedding_pb2.FLOAT32),
        (np.uint8, embedding_pb2.UINT8),
        (np.float16, embedding_pb2.FLOAT16),
    ],
)
def test_tensors_round_trip_as_raw_little_endian_bytes(dtype, wire):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    tensor = encode_tensor(array)
    assert (tensor.dtype, list(tensor.shape)) == (wire, [2, 3, 4])
    assert tensor.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = decode_tensor(embedding_pb2.Tensor.FromString(tensor.SerializeToString()))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_and_non_contiguous_arrays_are_sent_little_endian_in_c_order():
    array = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran-ordered view
    tensor = encode_tensor(array)
    assert tensor.data == np.ascontiguousarray(array, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_tensor(tensor), array)


def test_decoding_is_a_read_only_view():
    decoded = decode_tensor(encode_tensor(np.ones((2, 2), np.float32)))
    assert not decoded.flags.writeable


def test_unsupported_array_dtype_is_refused():
    with pytest.raises(TensorCodecError, match=r"array dtype: expected one of .*got float64"):
        encode_tensor(np.zeros(3))


@pytest.mark.parametrize(
    "tensor, message",
    [
        (
            embedding_pb2.Tensor(
                dtype=embedding_pb2.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"1234"
            ),
            r"inputs\.dtype: expected one of FLOAT32, UINT8, FLOAT16, got DATA_TYPE_UNSPECIFIED",
        ),
        (
            embedding_pb2.Tensor(dtype=42, shape=[1], data=b"1234"),
            r"inputs\.dtype: expected one of FLOAT32, UINT8, FLOAT16, got 42",
        ),
        (
            embedding_pb2.Tensor(dtype=embedding_pb2.FLOAT32, shape=[], data=b""),
            r"inputs\.shape: expected at least one dimension, none negative, got \[\]",
        ),
        (
            embedding_pb2.Tensor(dtype=embedding_pb2.FLOAT32, shape=[2, -1], data=b""),
            r"inputs\.shape: .* got \[2, -1\]",
        ),
        (
            embedding_pb2.Tensor(dtype=embedding_pb2.FLOAT32, shape=[2, 3], data=bytes(20)),
            r"inputs\.data: expected 24 bytes for shape \[2, 3\] of float32, got 20 bytes",
        ),
    ],
)
def test_malformed_tensors_name_the_field_expected_and_received(tensor, message):
    with pytest.raises(TensorCodecError, match=message):
        decode_tensor(tensor, "inputs")


def test_decode_raw_serves_other_raw_byte_protocols():
    data = np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(
        decode_raw(data, [2, 3], np.dtype("<f4"), "pixels"),
        np.arange(6, dtype=np.float32).reshape(2, 3),
    )
    with pytest.raises(TensorCodecError, match=r"^pixels\.data: expected 28 bytes"):
        decode_raw(data, [7], np.dtype("<f4"), "pixels")
