"""Request checks against a model card, prepared once per model version at load time.

`RequestSpec.from_card` turns a `ModelCard` into what a request must look like, so the hot
path compares a few numbers instead of re-reading the card. `check_shape` runs before any
decoding (a declared shape of the wrong rank never reaches numpy), `validate_inputs` after;
`parse_version` reads either API's version field. All raise `InvalidArgument` naming the
field, the expected and the received value (client-supplied values as bounded excerpts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aet.repository import ModelCard
from aet.server.errors import InvalidArgument, excerpt

FLOAT32 = np.dtype("<f4")
UINT8 = np.dtype("u1")
MAX_VERSION = 2**63 - 1  # versions travel as int64 (aet.v1) or as their decimal digits (KServe)
_VERSION_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits only: no "１", no "+1", no " 1"
_SHAPE_SHOWN = 8  # dimensions of a received shape quoted in a message


def parse_version(value: int | str, field: str = "version") -> int | None:
    """A requested version: None for the latest (0 or ""), else a positive integer.

    aet.v1 sends an int64 (0: latest), KServe a string of decimal digits ("": latest).
    """
    if isinstance(value, str):
        if not value:
            return None
        if not _VERSION_DIGITS.fullmatch(value):
            raise InvalidArgument(
                f"{field}: expected a positive integer of at most 19 ASCII digits or '' "
                f"(latest), got {excerpt(value)}"
            )
        value = int(value)
        if value == 0:
            raise InvalidArgument(f"{field}: expected a positive integer or '' (latest), got '0'")
    if value == 0:
        return None
    if not 1 <= value <= MAX_VERSION:
        raise InvalidArgument(
            f"{field}: expected a positive integer (0 or empty: latest), got {value}"
        )
    return value


def shape_text(shape: Sequence[int]) -> str:
    """A received shape for a message: in full when short, else its start and its rank."""
    dims = list(shape)
    if len(dims) <= _SHAPE_SHOWN:
        return str(dims)
    return f"[{', '.join(map(str, dims[:_SHAPE_SHOWN]))}, ...] ({len(dims)} dimensions)"


@dataclass(frozen=True)
class RequestSpec:
    """What one request for a model version may contain."""

    row_shape: tuple[int, ...]  # one input row, without the batch axis, e.g. (1, 8, 8)
    accepted_dtypes: tuple[np.dtype, ...]  # float32, plus uint8 when the value range allows
    max_rows: int  # the largest batch one request may carry

    @classmethod
    def from_card(cls, card: ModelCard, max_rows: int) -> RequestSpec:
        """float32 always; uint8 too when the graph's value range lies within 0..255 (vectors
        have no value range: float32 only)."""
        value_range = card.input.value_range
        fits_uint8 = value_range is not None and 0 <= value_range[0] and value_range[1] <= 255
        dtypes = (FLOAT32, UINT8) if fits_uint8 else (FLOAT32,)
        return cls(tuple(card.input.shape), dtypes, max_rows)

    @property
    def expected_shape(self) -> str:
        return str(["batch", *self.row_shape]).replace("'", "")


def check_shape(shape: Sequence[int], spec: RequestSpec, field: str = "inputs") -> None:
    """A declared shape must be [rows, *row shape] with rows >= 0, before any data is read."""
    if len(shape) != len(spec.row_shape) + 1 or tuple(shape[1:]) != spec.row_shape:
        raise InvalidArgument(
            f"{field}.shape: expected {spec.expected_shape}, got {shape_text(shape)}"
        )
    if shape[0] < 0:
        raise InvalidArgument(
            f"{field}.shape: expected at least one dimension, none negative, got {list(shape)}"
        )


def validate_inputs(inputs: np.ndarray, spec: RequestSpec, field: str = "inputs") -> np.ndarray:
    """`inputs` as float32 after checking dtype, shape, batch size and finiteness.

    `field` names the tensor in error messages (e.g. "inputs" or KServe's "inputs[pixels]").
    uint8 inputs are cast to float32 (the graph takes float32 in its raw pixel range).
    """
    if inputs.dtype not in spec.accepted_dtypes:
        expected = " or ".join(d.name for d in spec.accepted_dtypes)
        raise InvalidArgument(f"{field}.dtype: expected {expected}, got {inputs.dtype.name}")
    check_shape(inputs.shape, spec, field)
    rows = inputs.shape[0]
    if rows == 0:
        raise InvalidArgument(f"{field}.shape[0]: expected at least 1 row, got 0 (empty batch)")
    if rows > spec.max_rows:
        raise InvalidArgument(
            f"{field}.shape[0]: expected at most {spec.max_rows} rows per request, got {rows}"
        )
    if inputs.dtype == UINT8:
        return inputs.astype(FLOAT32)
    # NaN and Inf propagate through a float64 sum (which cannot overflow on float32 values), so
    # a finite sum proves every value finite without building a mask; only bad input pays more.
    if not math.isfinite(np.add.reduce(inputs, axis=None, dtype=np.float64)):
        bad_rows = np.flatnonzero(~np.isfinite(inputs.reshape(rows, -1)).all(axis=1))
        raise InvalidArgument(
            f"{field}.data: expected finite values, got NaN or Inf in row {int(bad_rows[0])}"
            f" ({bad_rows.size} row(s) affected)"
        )
    return inputs
