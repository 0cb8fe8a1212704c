"""The KServe v2 REST message formats: JSON inference requests and responses with the binary
tensor data extension, and Triton's JSON for its protobuf messages.

An inference body is a JSON header, then (when `Inference-Header-Content-Length` says where
the header ends) the raw little-endian bytes of each input that declares
`parameters.binary_data_size`, in order. `parse_infer_request` reads it for form (no model
needed), `decode_input` checks the one input against a model (`server.v2.check_input`,
`server.validation`), `infer_body` writes an answer from `server.v2.response_tensors`: JSON
`data` (flat, row-major) or, with `binary_data` / `binary_data_output`, bytes after the JSON
header. Every fault is `InvalidArgument` naming the field, the expected and the received.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from aet.proto.codec import decode_raw
from aet.server import v2
from aet.server.errors import InvalidArgument, excerpt
from aet.server.models import LoadedModel
from aet.server.pipeline import Outputs
from aet.server.validation import validate_inputs

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


def message_json(message: Message) -> dict:
    """A protobuf message of Triton's schema as Triton's HTTP API prints it: field names as in
    the .proto, fields at their defaults included, 64-bit integers as JSON numbers."""
    printed = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, printed)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(descriptor: Descriptor, printed: dict) -> dict:
    """`printed` with the 64-bit integers protobuf's JSON writes as strings turned to ints."""

    def convert(fd: FieldDescriptor, value: Any) -> Any:
        if fd.message_type is not None:
            return _numbers(fd.message_type, value)
        return int(value) if fd.type in _INT64 else value

    for fd in descriptor.fields:
        if fd.name not in printed:
            continue
        value = printed[fd.name]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            entry = fd.message_type.fields_by_name["value"]
            printed[fd.name] = {key: convert(entry, item) for key, item in value.items()}
        elif isinstance(value, list):
            printed[fd.name] = [convert(fd, item) for item in value]
        else:
            printed[fd.name] = convert(fd, value)
    return printed


def parse_json(data: bytes, what: str) -> dict:
    """`data` as a JSON object; `InvalidArgument` naming `what` otherwise."""
    try:
        parsed = json.loads(data) if data.strip() else {}
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        position = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InvalidArgument(
            f"{what}: expected a JSON object, got invalid JSON ({reason}{position})"
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what}: expected a JSON object, got a JSON {type(parsed).__name__}")
    return parsed


_JSON_TYPES = {str: "a string", bool: "true or false", int: "an integer", dict: "an object"}
_JSON_TYPES |= {list: "a list"}


def checked(value: Any, kind: type, field: str) -> Any:
    """`value` if it is a JSON `kind` (true and false are no integers), else `InvalidArgument`."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = f"a JSON {type(value).__name__}" if isinstance(value, dict | list) else excerpt(value)
        raise InvalidArgument(f"{field}: expected {_JSON_TYPES[kind]}, got {got}")
    return value


def typed(container: Mapping, key: str, kind: type, field: str, default: Any = None) -> Any:
    """`container[key]`, `checked` to be a `kind`; `default` if absent."""
    return checked(container[key], kind, field) if key in container else default


@dataclass
class RestInput:
    """One entry of a request's `inputs`, its data as JSON values or binary bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # the JSON `data`, when not binary
    binary_size: int | None = None  # `parameters.binary_data_size`, when binary
    binary: bytes | None = None  # its part of the binary section, once split


@dataclass
class RestRequest:
    """An inference request's JSON header and binary section, read and checked for form."""

    id: str | None
    inputs: list[RestInput]
    requested: list[v2.RequestedOutput]
    binary_outputs: dict[str, bool]  # output name -> its `binary_data` parameter, when given
    binary_default: bool  # the `binary_data_output` request parameter
    timeout: float | None


def parse_infer_request(body: bytes, header_length: str | None) -> RestRequest:
    """Split the body into its JSON header and binary section and read both; every fault is
    `InvalidArgument` naming the field (no model is needed yet)."""
    length = None
    if header_length is not None:
        digits = re.fullmatch(r"\s*([0-9]{1,19})\s*", header_length)
        if digits is None or not 0 < int(digits[1]) <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH}: expected the JSON header's length in bytes, 1 to "
                f"{len(body)} (the body's length), got {excerpt(header_length)}"
            )
        length = int(digits[1])
    what = "body" if length is None else f"body[:{HEADER_LENGTH}] ({length} bytes)"
    header = parse_json(body if length is None else body[:length], what)
    parameters = typed(header, "parameters", dict, "parameters", {})
    v2.check_parameters(parameters)
    timeout = typed(parameters, "timeout", int, "parameters['timeout']")
    inputs = [
        _input(entry, i) for i, entry in enumerate(typed(header, "inputs", list, "inputs", []))
    ]
    requested, binary_outputs = [], {}
    for i, entry in enumerate(typed(header, "outputs", list, "outputs", [])):
        entry = checked(entry, dict, f"outputs[{i}]")
        name = typed(entry, "name", str, f"outputs[{i}].name", "")
        params = typed(entry, "parameters", dict, f"outputs[{i}].parameters", {})
        count_field = f"outputs[{i}].parameters['{v2.CLASSIFICATION_PARAMETER}']"
        count = typed(params, v2.CLASSIFICATION_PARAMETER, int, count_field)
        requested.append(v2.RequestedOutput(name, count))
        binary = typed(params, "binary_data", bool, f"outputs[{i}].parameters['binary_data']")
        if binary is not None:
            binary_outputs[name] = binary
    _split_binary(inputs, body[length:] if length is not None else None)
    return RestRequest(
        id=typed(header, "id", str, "id"),
        inputs=inputs,
        requested=requested,
        binary_outputs=binary_outputs,
        binary_default=typed(
            parameters, "binary_data_output", bool, "parameters['binary_data_output']", False
        ),
        timeout=None if timeout is None else v2.timeout_seconds(timeout),
    )


def _input(entry: Any, i: int) -> RestInput:
    """`inputs[i]` read for form: name, datatype, shape, and where its data is."""
    entry = checked(entry, dict, f"inputs[{i}]")
    shape = typed(entry, "shape", list, f"inputs[{i}].shape", [])
    for dim in shape:
        checked(dim, int, f"inputs[{i}].shape")
    size_field = f"inputs[{i}].parameters['binary_data_size']"
    params = typed(entry, "parameters", dict, f"inputs[{i}].parameters", {})
    size = typed(params, "binary_data_size", int, size_field)
    if size is not None and size < 0:
        raise InvalidArgument(f"{size_field}: expected a number of bytes >= 0, got {size}")
    if size is not None and "data" in entry:
        raise InvalidArgument(
            f"inputs[{i}].data: expected it absent when {size_field} is given, got both"
        )
    return RestInput(
        name=typed(entry, "name", str, f"inputs[{i}].name", ""),
        datatype=typed(entry, "datatype", str, f"inputs[{i}].datatype", ""),
        shape=shape,
        data=entry.get("data"),
        binary_size=size,
    )


def _split_binary(inputs: list[RestInput], section: bytes | None) -> None:
    """Give each input that declared `binary_data_size` its bytes of the binary section; the
    section must hold exactly what they declare."""
    binary = [tensor for tensor in inputs if tensor.binary_size is not None]
    declared = sum(tensor.binary_size or 0 for tensor in binary)
    if section is None:
        if binary:
            raise InvalidArgument(
                f"{HEADER_LENGTH}: expected the header with binary inputs (parameters."
                f"binary_data_size of {binary[0].name or 'inputs'}), got none"
            )
        return
    if len(section) != declared:
        raise InvalidArgument(
            f"binary data: expected {declared} bytes after the JSON header (the sum of the "
            f"inputs' parameters.binary_data_size), got {len(section)}"
        )
    offset = 0
    for tensor in binary:
        size = tensor.binary_size or 0
        tensor.binary = section[offset : offset + size]
        offset += size


def decode_input(request: RestRequest, model: LoadedModel) -> np.ndarray:
    """The request's one input as a checked float32 array (rows, *row shape)."""
    tensor = request.inputs[0] if request.inputs else RestInput("", "", [])
    field, dtype = v2.check_input(
        len(request.inputs), tensor.name, tensor.datatype, tensor.shape, model
    )
    if tensor.binary is not None:
        array = decode_raw(tensor.binary, tensor.shape, dtype, field)
    else:
        array = _json_values(tensor, dtype, field)
    return validate_inputs(array, model.request_spec, field)


def _json_values(tensor: RestInput, dtype: np.dtype, field: str) -> np.ndarray:
    """The tensor's JSON `data` (flat or nested lists of numbers) as an array of its shape."""
    count = math.prod(tensor.shape)
    if tensor.data is None:
        raise InvalidArgument(
            f"{field}.data: expected {count} values for shape {tensor.shape} (or binary data "
            "with parameters.binary_data_size), got none"
        )
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):  # ragged nesting, numbers too large for any dtype
        values = np.asarray([], dtype=object)
    if values.dtype.kind not in "iuf" or (values.size == 0 and count != 0):
        raise InvalidArgument(
            f"{field}.data: expected numbers as a flat or evenly nested list, got "
            f"{excerpt(tensor.data)}"
        )
    if values.size != count:
        raise InvalidArgument(
            f"{field}.data: expected {count} values for shape {tensor.shape}, got {values.size}"
        )
    if dtype == np.uint8:
        bad = values[(values < 0) | (values > 255) | (values != np.round(values))]
        if bad.size:
            raise InvalidArgument(
                f"{field}.data: expected UINT8 values, whole numbers 0..255, got {bad.flat[0]}"
            )
    return values.astype(dtype).reshape(tensor.shape)


def infer_body(
    request: RestRequest, model: LoadedModel, outputs: Outputs
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: each output of `v2.response_tensors` as JSON `data`
    or, when asked, as bytes after the JSON header (`Inference-Header-Content-Length`)."""
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        header["id"] = request.id
    entries, binary = [], []
    for tensor in v2.response_tensors(request.requested, model, outputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if request.binary_outputs.get(tensor.name, request.binary_default):
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = tensor.array.ravel().tolist()
        entries.append(entry)
    header["outputs"] = entries
    text = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return text, {"Content-Type": JSON_TYPE}
    return b"".join([text, *binary]), {
        "Content-Type": BINARY_TYPE,
        HEADER_LENGTH: str(len(text)),
    }
