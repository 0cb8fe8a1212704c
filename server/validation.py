"""Request checks against a model card, prepared once per model version at load time.

`RequestSpec.from_card` turns a `ModelCard` into what a request must look like, so the hot
path compares a few numbers instead of re-reading the card. `validate_inputs` raises
`InvalidArgument` naming the field, the expected and the received value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aet.server.errors import InvalidArgument
from aet.server.repository import ModelCard

FLOAT32 = np.dtype("<f4")
UINT8 = np.dtype("u1")


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


def validate_inputs(inputs: np.ndarray, spec: RequestSpec, field: str = "inputs") -> np.ndarray:
    """`inputs` as float32 after checking dtype, shape, batch size and finiteness.

    `field` names the tensor in error messages (e.g. "inputs" or KServe's "inputs[pixels]").
    uint8 inputs are cast to float32 (the graph takes float32 in its raw pixel range).
    """
    if inputs.dtype not in spec.accepted_dtypes:
        expected = " or ".join(d.name for d in spec.accepted_dtypes)
        raise InvalidArgument(f"{field}.dtype: expected {expected}, got {inputs.dtype.name}")
    if inputs.shape[1:] != spec.row_shape:
        raise InvalidArgument(
            f"{field}.shape: expected {spec.expected_shape}, got {list(inputs.shape)}"
        )
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
