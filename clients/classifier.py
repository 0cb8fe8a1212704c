"""`Classifier`: a classifier model (`aet head`) run in-process with onnxruntime.

The local counterpart of `EmbeddingClient.classify`: the same graph, the same `Classification`
(probabilities and top-k classes, `server.classification.classify`), no server.
"""

from __future__ import annotations

import os

import numpy as np

from aet.clients.backends import BackendError, find_model_version
from aet.server.classification import Classification, classify
from aet.server.repository import ModelCard
from aet.server.runtime import EncoderSession, RuntimeOptions, resolve_providers


class Classifier:
    """A classifier version loaded from `exported/<model>[/<version>]` (latest by default).

    `device` is "auto", "cpu" or "cuda", decided as the server decides it.

    Example::

        classifier = Classifier("exported/digits-head")
        result = classifier.classify(pixels, top_k=3)  # pixels (N, 1, 8, 8) in [0, 16]
        result.predicted_labels                        # (N,) str
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", threads: int = 0):
        found = find_model_version(path)
        if found.card.classifier is None:
            raise BackendError(
                f"model folder {path}: expected a classifier (aet head), got encoder "
                f"{found.name} v{found.version} with output {found.card.output.name!r}"
            )
        self.card: ModelCard = found.card
        self._session = EncoderSession(
            found.model_path,
            self.card.input.name,
            self.card.output.name,
            self.input_shape,
            resolve_providers(device),
            RuntimeOptions(device=device, intra_op_threads=threads),
        )

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> int:
        return self.card.version

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names, by output column."""
        return self.card.classifier.labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.card.input.shape)

    def predict_proba(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Probabilities (N, K) float32 of inputs `x` (N, *input_shape) in the card's value
        range, any real dtype."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[1:] != self.input_shape or len(x) == 0:
            raise ValueError(
                f"x shape: expected (N >= 1, {', '.join(map(str, self.input_shape))}), "
                f"got {x.shape}"
            )
        x = x.astype(np.float32, copy=False)
        return np.concatenate(
            [self._session.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        )

    def classify(self, x: np.ndarray, top_k: int = 1) -> Classification:
        """Probabilities and the `top_k` most probable classes of each row of `x`."""
        if not 1 <= top_k <= len(self.labels):
            raise ValueError(f"top_k: expected 1 to {len(self.labels)}, got {top_k}")
        return classify(self.predict_proba(x), top_k, self.labels)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) str: the most probable class name of each row of `x`."""
        return self.classify(x).predicted_labels
