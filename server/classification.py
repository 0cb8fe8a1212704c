"""Classifier models: top-k classes from served probabilities, for both gRPC APIs.

A classifier model (its card has a `classifier` section) outputs `probabilities` (N, K). Our
API's `Classify` answers them with the top-k classes (`classify`); the KServe v2 API (gRPC and
HTTP) answers a requested output with the `classification` parameter as Triton's classification
extension does: a BYTES tensor (N, k) of "score:index:label" strings, most probable first
(`kserve_classification`). Everything here is protocol-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aet.repository import ModelCard
from aet.server.errors import InvalidArgument


@dataclass(frozen=True)
class Classification:
    """Class probabilities of N rows and their k most probable classes (highest first)."""

    probabilities: np.ndarray  # (N, K) float32, rows sum to 1
    indices: np.ndarray  # (N, k) int64 class indices
    scores: np.ndarray  # (N, k) float32: probabilities[row, indices[row]]
    labels: np.ndarray  # (N, k) str: the class names of `indices`

    @property
    def predicted(self) -> np.ndarray:
        """(N,) int64: the most probable class of each row."""
        return self.indices[:, 0]

    @property
    def predicted_labels(self) -> np.ndarray:
        """(N,) str: the name of the most probable class of each row."""
        return self.labels[:, 0]


def class_labels(card: ModelCard, field: str = "model") -> tuple[str, ...]:
    """The card's class names; `InvalidArgument` naming `field` if the model is no classifier."""
    if card.classifier is None:
        raise InvalidArgument(
            f"{field}: expected a classifier model (output 'probabilities' with class labels), "
            f"got {card.name!r} v{card.version}, an encoder with output {card.output.name!r}"
        )
    return card.classifier.labels


def check_top_k(k: int, num_classes: int, field: str) -> int:
    """`k` if 1 <= k <= num_classes, else `InvalidArgument` naming `field`."""
    if not 1 <= k <= num_classes:
        raise InvalidArgument(f"{field}: expected 1 to {num_classes} (the classes), got {k}")
    return k


def classify(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> Classification:
    """The top `k` classes of each row of `probabilities` (N, K); ties go to the lower index."""
    # A stable sort of the negated scores keeps equal scores in class order.
    indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :k].astype(np.int64)
    return Classification(
        probabilities=probabilities,
        indices=indices,
        scores=np.take_along_axis(probabilities, indices, axis=1),
        labels=np.asarray(labels, dtype=str)[indices],
    )


# --- KServe v2 classification extension ------------------------------------------------------


def check_class_count(k: int, field: str, card: ModelCard) -> int:
    """A requested output's `classification` class count, checked against the model: only
    classifiers have classes, and 1 <= class_count <= K (`InvalidArgument` naming `field`)."""
    class_labels(card, field)
    return check_top_k(k, card.output.embedding_dim, f"{field} (class_count)")


def kserve_classification(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification output for the top `k` classes: (N, k) "score:index:label"
    strings, most probable first (score printed as C++'s `std::to_string` prints a float, as
    Triton does)."""
    top = classify(probabilities, k, labels)
    rows = zip(top.scores.flat, top.indices.flat, top.labels.flat, strict=True)
    elements = [f"{score:f}:{index}:{label}" for score, index, label in rows]
    return np.array(elements, dtype=object).reshape(top.indices.shape)
