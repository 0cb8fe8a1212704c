"""`aet.Classifier`: a classifier model (`aet head`) from the model repository, in this process.

An `Encoder` whose graph ends in a head: the same repository reading, provider choice, input
handling and session, with the card's class labels. It answers what `EmbeddingClient.classify`
answers over gRPC, a `Classification` (`server.classification.classify`), without a server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aet.encoder import DEFAULT_BATCH_SIZE, Encoder
from aet.errors import UserError
from aet.runtime import EncoderSession
from aet.server.classification import Classification, classify


class Classifier(Encoder):
    """A classifier version (`exported/<head>[/<version>]`) run with onnxruntime in-process.

    Create it with `Classifier.load` (the arguments of `Encoder.load`).

    Attributes
    ----------
    labels : tuple of str
        Class names, by output column.
    (and those of `Encoder`; `embedding_dim` is the number of classes)

    Examples
    --------
    >>> classifier = Classifier.load("exported/digits-head")
    >>> result = classifier.classify(load_digits().images, top_k=3)
    >>> result.labels.shape, result.probabilities.shape
    ((1797, 3), (1797, 10))
    """

    def __init__(
        self,
        model_dir: Path,
        card: Any,
        session: EncoderSession,
        calibration: np.ndarray | None = None,
    ):
        if card.classifier is None:
            raise UserError(
                f"model {card.name} v{card.version}: expected a classifier (aet head), got an "
                f"encoder with output {card.output.name!r}; load it with aet.Encoder"
            )
        super().__init__(model_dir, card, session, calibration)
        self.labels: tuple[str, ...] = tuple(card.classifier.labels)

    def __repr__(self) -> str:
        return (
            f"Classifier({self.name!r}, version={self.version}, input_shape={self.input_shape}, "
            f"classes={len(self.labels)}, provider={self.provider!r})"
        )

    def predict_proba(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N, K) float32 of `X` (the inputs `Encoder.transform` takes)."""
        return self.transform(X, batch_size)

    def classify(self, X: Any, top_k: int = 1) -> Classification:
        """Probabilities (N, K) and the `top_k` most probable classes of each row of `X`:
        `indices`, `scores` and `labels` (N, top_k), highest first."""
        if not 1 <= top_k <= len(self.labels):
            raise ValueError(f"top_k: expected 1 to {len(self.labels)}; got {top_k}")
        return classify(self.predict_proba(X), top_k, self.labels)

    def predict(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(N,) str: the most probable class name of each row of `X` (a classifier's
        `predict` is its classes, not `Encoder.predict`'s novelty flags)."""
        return classify(self.predict_proba(X, batch_size), 1, self.labels).predicted_labels
