"""`aet.Encoder`: an exported encoder from the model repository, run in this process.

It reads the repository as the server does (`aet.repository`, sha256 verified), picks the
execution provider as the server does (`aet.runtime.resolve_providers`) and runs the same
`aet.runtime.EncoderSession`, so its embeddings are the ones `aet serve` returns.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from aet.conformal import P_VALUE_NAME, p_values, threshold
from aet.errors import UserError
from aet.repository import (
    CARD_FILE,
    SCORE_NAME,
    ModelCard,
    ModelVersion,
    check_sha256,
    find_model_version,
    read_calibration,
)
from aet.runtime import EncoderSession, Outputs, RuntimeOptions, resolve_providers

DEFAULT_BATCH_SIZE = 1024


class Encoder:
    """An exported encoder (`exported/<model>[/<version>]`) run with onnxruntime in-process.

    Create it with `Encoder.load`. Card fields are plain Python values.

    Attributes
    ----------
    name : str
        Model name (its folder in the repository).
    version : int
        The loaded version.
    embedding_dim : int
        Width of each embedding.
    input_shape : tuple of int
        Shape of one input row without the batch axis, e.g. ``(1, 8, 8)`` (C, H, W).
    value_range : tuple of float or None
        ``(low, high)``: the raw value range the graph expects, e.g. ``(0.0, 16.0)``; None for
        vectors standardised inside the graph (any finite value).
    score_percentiles : dict or None
        The novelty score's percentiles on the validation split (``"p50"``, ``"p90"``,
        ``"p99"``, ``"p99.9"``), in `reconstruction_error` units; None for graphs without it.
    card : dict
        The whole `model.json` (training data and split, metrics, preprocessing, sha256).
    provider : str
        The onnxruntime execution provider in use (``"CUDAExecutionProvider"`` or CPU).
    alpha : float or None
        `predict` flags rows whose conformal p-value is <= alpha (default 0.05); set
        `contamination` instead to flag that fraction of the calibration rows' score range.
    contamination : float or None
    offset_ : float
        scikit-learn's convention: ``decision_function(X) = score_samples(X) - offset_``.

    Examples
    --------
    >>> encoder = Encoder.load("exported/digits")
    >>> encoder.transform(load_digits().images).shape
    (1797, 8)
    """

    def __init__(
        self,
        model_dir: Path,
        card: Any,
        session: EncoderSession,
        calibration: np.ndarray | None = None,
    ):
        self.path = model_dir
        self.name: str = card.name
        self.version: int = card.version
        self.embedding_dim: int = card.output.embedding_dim
        self.input_shape: tuple[int, ...] = tuple(card.input.shape)
        value_range = card.input.value_range
        self.value_range: tuple[float, float] | None = (
            None if value_range is None else tuple(value_range)
        )
        self.score_percentiles: dict[str, float] | None = (
            None if card.score is None else dict(card.score.percentiles)
        )
        self.card: dict[str, Any] = card.to_dict()
        self.provider: str = session.provider
        self._session = session
        self._calibration = calibration  # sorted validation scores (conformal p-values)
        self.alpha: float | None = 0.05
        self.contamination: float | None = None
        self._lock = threading.Lock()  # an onnxruntime session run with IO binding: one caller

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        version: int | None = None,
        device: str = "auto",
        threads: int = 0,
    ) -> Encoder:
        """Load `exported/<model>` (its latest usable version, or `version`) or a version folder.

        Parameters
        ----------
        path : str or path-like
            ``exported/<model>`` or ``exported/<model>/<version>``.
        version : int, optional
            The version to load from a model folder (default: the highest usable one).
        device : {"auto", "cpu", "cuda"}
            As ``aet serve --device``: "auto" uses CUDA only when a GPU is really usable.
        threads : int
            onnxruntime intra-op threads (0: its default).

        Raises
        ------
        aet.errors.UserError
            No such folder or version, a refused version (bad card, sha256 mismatch), or
            ``device="cuda"`` without a usable GPU.
        """
        path = Path(path)
        if version is not None:
            if (path / CARD_FILE).exists():
                raise ValueError(
                    f"version: {path} is already a version folder; pass its model folder "
                    f"with version={version}, or the version folder alone"
                )
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"version: expected a positive integer; got {version!r}")
            if not (path / str(version) / CARD_FILE).exists():
                found_versions = sorted(
                    int(p.name) for p in path.glob("[1-9]*") if (p / CARD_FILE).exists()
                )
                raise UserError(
                    f"version: model folder {path} has no version {version}; "
                    f"found versions {found_versions or 'none'}"
                )
            path = path / str(version)
        return cls.open(find_model_version(path), device, threads)

    @classmethod
    def open(cls, found: ModelVersion, device: str = "auto", threads: int = 0) -> Encoder:
        """The encoder of a scanned, usable version (`aet.repository.find_model_version`)."""
        card = found.usable_card
        calibration = read_calibration(found.path, card)
        return cls._from_file(found.path, found.model_path, card, device, threads, calibration)

    @classmethod
    def from_bytes(
        cls,
        onnx: bytes,
        card: ModelCard,
        device: str = "auto",
        threads: int = 0,
        calibration: np.ndarray | None = None,
    ) -> Encoder:
        """The encoder of shipped graph bytes and their card (e.g. on a Ray worker, with no
        model folder on its disk), checked against the card's sha256; `calibration`: the
        version's sorted calibration scores (`aet.repository.read_calibration`), for p-values."""
        check_sha256(onnx, card, f"model {card.name} v{card.version} (shipped bytes)")
        with tempfile.TemporaryDirectory(prefix="aet-encoder-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(onnx)
            return cls._from_file(Path(folder), path, card, device, threads, calibration)

    @classmethod
    def _from_file(
        cls,
        folder: Path,
        model_path: Path,
        card: ModelCard,
        device: str,
        threads: int,
        calibration: np.ndarray | None = None,
    ) -> Encoder:
        options = RuntimeOptions(device=device, intra_op_threads=threads)
        session = EncoderSession.from_card(
            model_path, card, resolve_providers(device), options, score=True
        )
        return cls(folder, card, session, calibration)

    def __repr__(self) -> str:
        return (
            f"Encoder({self.name!r}, version={self.version}, input_shape={self.input_shape}, "
            f"embedding_dim={self.embedding_dim}, provider={self.provider!r})"
        )

    def rows(self, X: Any) -> np.ndarray:
        """`X` as the graph's float32 rows `(N, *input_shape)`; raises on anything else.

        Accepts any real numeric dtype (bool, integers, floats) and the shapes
        `(N, *input_shape)`, `(N, H, W)` for one-channel images, and `(N, D)` with
        `D = prod(input_shape)`.
        """
        X = np.asarray(X)
        if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise TypeError(f"X dtype: expected a real numeric dtype; got {X.dtype}")
        if np.issubdtype(X.dtype, np.complexfloating):
            raise TypeError(f"X dtype: expected a real numeric dtype; got {X.dtype}")
        shape = self.input_shape
        accepted = [shape]
        if len(shape) == 3 and shape[0] == 1:
            accepted.append(shape[1:])  # (N, H, W): grey images without the channel axis
        if len(shape) > 1:
            accepted.append((math.prod(shape),))  # (N, D): flattened rows
        if X.ndim < 1 or tuple(X.shape[1:]) not in accepted:
            shown = " or ".join("(N, " + ", ".join(map(str, s)) + ")" for s in accepted)
            raise ValueError(
                f"X shape: expected {shown} for model {self.name} v{self.version}; got {X.shape}"
            )
        rows = X.astype(np.float32, copy=False).reshape(len(X), *shape)
        if not np.isfinite(rows).all():
            bad = int((~np.isfinite(rows)).any(axis=tuple(range(1, rows.ndim))).sum())
            raise ValueError(f"X: expected finite values; {bad} row(s) hold NaN or Inf")
        return rows

    def transform(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Embeddings of `X`.

        Parameters
        ----------
        X : array-like of shape (N, *input_shape), (N, H, W) or (N, D)
            Rows in the model's raw `value_range`, any real numeric dtype.
        batch_size : int
            Rows per onnxruntime run.

        Returns
        -------
        ndarray of shape (N, embedding_dim), float32
        """
        return self.run(X, batch_size=batch_size)[self._session.output_name]

    def reconstruction_error(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """The novelty score of each row of `X`, as served: the reconstruction error in the
        model's likelihood terms (`card["score"]["measure"]`). Higher is more unusual; compare
        it with `score_percentiles` to flag rows (e.g. above ``"p99"``).

        Parameters
        ----------
        X : array-like, as for `transform`
        batch_size : int
            Rows per onnxruntime run.

        Returns
        -------
        ndarray of shape (N,), float32
        """
        return self.run(X, score=True, batch_size=batch_size)[self.card["score"]["name"]]

    def score_samples(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """scikit-learn's novelty convention: the opposite of `reconstruction_error`, so the
        lower, the more abnormal (as `IsolationForest.score_samples`).

        Returns
        -------
        ndarray of shape (N,), float32
        """
        return -self.reconstruction_error(X, batch_size)

    def _calibration_scores(self, output: str) -> np.ndarray:
        if self._calibration is None:
            raise ValueError(
                f"{output}: model {self.name} v{self.version} has no calibration scores "
                f"(exported before {P_VALUE_NAME} existed); export it again"
            )
        return self._calibration

    def p_value(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Conformal p-value of each row of `X`: the fraction of the validation rows' scores
        at least as large as the row's, ``(1 + #{calibration >= score}) / (n + 1)``. For
        normal rows ``P(p <= alpha) <= alpha``; small p-values mark unusual rows.

        Returns
        -------
        ndarray of shape (N,), float32 in (0, 1]
        """
        return self.run(X, batch_size=batch_size, p_value=True)[P_VALUE_NAME]

    @property
    def offset_(self) -> float:
        """``-threshold``: rows scoring above the threshold (`alpha` or `contamination`) are
        novel, i.e. ``decision_function < 0``."""
        calibration = self._calibration_scores("offset_")
        return -threshold(calibration, self.alpha, self.contamination)

    def decision_function(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for novel rows (scikit-learn's convention).

        Returns
        -------
        ndarray of shape (N,), float64 (-inf-free; +inf margin when nothing can be flagged)
        """
        offset = self.offset_
        return self.score_samples(X, batch_size).astype(np.float64) - offset

    def predict(self, X: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """+1 for normal rows, -1 for novel ones (``decision_function < 0``).

        Returns
        -------
        ndarray of shape (N,), int64
        """
        return np.where(self.decision_function(X, batch_size) < 0, -1, 1).astype(np.int64)

    def run(
        self,
        X: Any,
        score: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        p_value: bool = False,
    ) -> Outputs:
        """The graph's named outputs for the rows of `X`: the embedding (N, embedding_dim),
        with `score` the novelty score (N,) as `reconstruction_error`, and with `p_value` the
        score too and its conformal p-value (N,) as `p_value` (the one computation, on the
        version's calibration scores; `ValueError` for a version without them); float32."""
        if p_value:
            calibration = self._calibration_scores(P_VALUE_NAME)
            outputs = self.run(X, True, batch_size)
            return {**outputs, P_VALUE_NAME: p_values(calibration, outputs[SCORE_NAME])}
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer; got {batch_size}")
        if score and self.score_percentiles is None:
            raise ValueError(
                f"model {self.name} v{self.version}: its graph has no novelty score "
                f"(exported before reconstruction_error existed); export it again"
            )
        names = self._session.output_sets[1 if score else 0]
        rows = self.rows(X)
        if len(rows) == 0:
            widths = {self._session.output_name: (self.embedding_dim,)}
            return {name: np.zeros((0, *widths.get(name, ())), np.float32) for name in names}
        with self._lock:
            parts = [
                self._session.run(np.ascontiguousarray(rows[start : start + batch_size]), names)
                for start in range(0, len(rows), batch_size)
            ]
        return {
            name: np.concatenate([part[name] for part in parts]).astype(np.float32, copy=False)
            for name in names
        }
