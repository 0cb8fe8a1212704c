"""`aet.AutoencoderEmbedder`: autoencoder pretraining as a scikit-learn transformer.

`fit` runs the same `training.train.Trainer` and models as `aet pretrain`, on an array instead
of a registered data set; `transform` returns the codes; `export` writes a model-repository
version through `training.export`, so `aet serve` and `aet.Encoder` serve it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data

from aet.config import ConfigError
from aet.conformal import p_values, threshold
from aet.training.checkpoint import load_checkpoint
from aet.training.data import LoadedImages, Split, cut_dataset
from aet.training.dataspec import DataSpec
from aet.training.export import (
    DEFAULT_OPSET,
    PARITY_ROWS,
    VECTOR_INPUT_NAME,
    ExportedEncoder,
    StandardizeModule,
    export_encoder,
)
from aet.training.models import ModelConfig
from aet.training.novelty import DEFAULT_NEIGHBOURS, NoveltyScore, ScoreSettings, check_layer
from aet.training.pretrain import PretrainConfig
from aet.training.standardize import FeatureStandardizer
from aet.training.train import TrainingConfig

_PRETRAIN = PretrainConfig()  # the `aet pretrain` defaults the hyper-parameters share
TRANSFORM_BATCH = 1024


class AutoencoderEmbedder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Pretrain an autoencoder on feature rows and embed rows with its encoder.

    The hyper-parameters are those of `aet pretrain` (same names, with underscores). With
    ``loss="mse"`` (the default, a Gaussian decoder) or ``loss="gaussian"`` (a Gaussian decoder
    that also predicts each feature's variance) the features are standardised with the
    mean and standard deviation learned in `fit`, so any finite real-valued data works; with
    ``loss="bce"`` (a Bernoulli decoder) the features are used as they are and must lie in
    [0, 1]. A seeded `val_fraction` of the rows is held out for early stopping.

    Parameters
    ----------
    architecture : {"mlp", "linear", "stacked", "vae"}
    hidden_sizes : tuple of int
        Hidden layer sizes, input side first.
    code_size : int
        Embedding dimension.
    activation : {"relu", "tanh", "sigmoid", "gelu", "elu"}
    tied_weights : bool or None
        Decoder reuses the transposed encoder weights (None: where the architecture can).
    loss : {"mse", "gaussian", "bce"}
    allow_overcomplete : bool
        Permit ``code_size >= n_features``.
    noise : {"none", "gaussian", "masking", "salt-and-pepper"}
        Denoising corruption during training (applied to the standardised features).
    noise_level : float
    epochs, layer_epochs, batch_size, learning_rate, patience : as `aet pretrain`
    val_fraction : float in (0, 1)
    seed : int
        Seed of the validation split, initialisation, shuffling and noise.
    progress : bool
        Show training progress bars.
    score_density : bool
        The novelty score adds a density term of the code to the reconstruction term
        (`training.novelty`: for feature vectors the code's Mahalanobis distance from the
        training codes, for images its local outlier factor among them); False: the
        reconstruction term alone.
    score_neighbours : int
        Neighbours of the density term's local outlier factor (images).
    score_layer : {"code", "hidden"}
        What the density term measures: the code, or the encoder's first hidden layer (fully
        connected encoders; the choice for small images with a small code, docs/novelty.md).
    image_shape : tuple (channels, height, width) or None
        The rows are flattened images of this shape: the novelty score smooths the difference
        between an image and its reconstruction before squaring it (`training.novelty`).
        None: the rows are feature vectors.
    alpha : float or None
        `predict` flags rows whose conformal p-value (against the validation rows' scores) is
        <= alpha; or give `contamination` (and alpha=None) to flag the scores above the
        validation scores' (1 - contamination) quantile.
    contamination : float or None

    Attributes
    ----------
    n_features_in_ : int
    embedding_dim_ : int
    standardizer_ : FeatureStandardizer or None
        The statistics learned in `fit` (None with ``loss="bce"``).
    history_ : dict
        Per-stage train and validation losses.
    model_ : torch.nn.Module
        The trained autoencoder (best validation weights), in eval mode.
    novelty_ : training.novelty.NoveltyScore
        The novelty score `export` puts in the graph.
    calibration_scores_ : ndarray of shape (n_val,)
        The validation rows' novelty scores, sorted (conformal p-values).
    offset_ : float
        ``decision_function(X) = score_samples(X) - offset_``.

    Examples
    --------
    >>> X, y = load_digits(return_X_y=True)
    >>> embedder = AutoencoderEmbedder(code_size=16, epochs=30).fit(X)
    >>> embedder.transform(X).shape
    (1797, 16)
    """

    def __init__(
        self,
        architecture: str = _PRETRAIN.model.architecture,
        hidden_sizes: tuple[int, ...] = tuple(_PRETRAIN.model.hidden_sizes),
        code_size: int = _PRETRAIN.model.code_size,
        activation: str = _PRETRAIN.model.activation,
        tied_weights: bool | None = None,
        loss: str = "mse",
        allow_overcomplete: bool = False,
        noise: str = _PRETRAIN.training.noise,
        noise_level: float = _PRETRAIN.training.noise_level,
        epochs: int = _PRETRAIN.training.epochs,
        layer_epochs: int = _PRETRAIN.training.layer_epochs,
        batch_size: int = _PRETRAIN.training.batch_size,
        learning_rate: float = _PRETRAIN.training.learning_rate,
        patience: int = _PRETRAIN.training.patience,
        val_fraction: float = _PRETRAIN.val_fraction,
        seed: int = _PRETRAIN.seed,
        progress: bool = False,
        score_density: bool = True,
        score_neighbours: int = DEFAULT_NEIGHBOURS,
        score_layer: str = "code",
        image_shape: tuple[int, int, int] | None = None,
        alpha: float | None = 0.05,
        contamination: float | None = None,
    ):
        self.architecture = architecture
        self.hidden_sizes = hidden_sizes
        self.code_size = code_size
        self.activation = activation
        self.tied_weights = tied_weights
        self.loss = loss
        self.allow_overcomplete = allow_overcomplete
        self.noise = noise
        self.noise_level = noise_level
        self.epochs = epochs
        self.layer_epochs = layer_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.val_fraction = val_fraction
        self.seed = seed
        self.progress = progress
        self.score_density = score_density
        self.score_neighbours = score_neighbours
        self.score_layer = score_layer
        self.image_shape = image_shape
        self.alpha = alpha
        self.contamination = contamination

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # codes are float32 whatever X is
        return tags

    def _pretrain_config(self) -> PretrainConfig:
        """The hyper-parameters as the `aet pretrain` configuration (validates them)."""
        if self.architecture == "conv":
            raise ValueError(
                "architecture: 'conv' needs images (C, H, W); AutoencoderEmbedder takes feature "
                "rows (N, D): use mlp, linear, stacked or vae"
            )
        try:
            return PretrainConfig(
                data=DataSpec(seed=self.seed, val_fraction=self.val_fraction),
                model=ModelConfig(
                    architecture=self.architecture,
                    hidden_sizes=tuple(self.hidden_sizes),
                    code_size=self.code_size,
                    activation=self.activation,
                    tied_weights=self.tied_weights,
                    loss=self.loss,
                    allow_overcomplete=self.allow_overcomplete,
                ),
                training=TrainingConfig(
                    noise=self.noise,
                    noise_level=self.noise_level,
                    epochs=self.epochs,
                    layer_epochs=self.layer_epochs,
                    batch_size=self.batch_size,
                    learning_rate=self.learning_rate,
                    patience=self.patience,
                    progress=self.progress,
                ),
            )
        except (ConfigError, TypeError) as exc:
            raise ValueError(str(exc)) from exc

    def _features(self, X: np.ndarray) -> np.ndarray:
        """What the autoencoder sees: standardised (mse) or as given (bce), float32 (N, D)."""
        if self.standardizer_ is not None:
            return self.standardizer_.transform(X)
        return X.astype(np.float32, copy=False)

    def fit(self, X: ArrayLike, y: object = None) -> AutoencoderEmbedder:
        """Pretrain the autoencoder on the rows of `X`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), finite real values, n_samples >= 2
        y : ignored

        Returns
        -------
        self
        """
        config = self._pretrain_config()
        rows: np.ndarray = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_min_samples=2
        )
        n_rows, n_features = rows.shape
        if config.model.loss == "bce" and (rows.min() < 0 or rows.max() > 1):
            raise ValueError(
                f"X: loss='bce' needs features in [0, 1]; got values in "
                f"[{rows.min():g}, {rows.max():g}] (use loss='mse', which standardises them)"
            )
        standardise = config.model.loss != "bce"  # the Gaussian decoders, mse and gaussian
        self.standardizer_ = FeatureStandardizer.fit(rows) if standardise else None
        low, high = float(rows.min()), float(rows.max())
        self.feature_range_ = (low, high if high > low else low + 1.0)
        features = self._features(rows)
        image_shape = (n_features,) if self.image_shape is None else tuple(self.image_shape)
        if math.prod(image_shape) != n_features or len(image_shape) not in (1, 3):
            raise ValueError(
                f"image_shape: expected (channels, height, width) whose product is X's "
                f"{n_features} features; got {self.image_shape}"
            )
        rows_read = LoadedImages(
            pool=Split(features.reshape(n_rows, *image_shape), None),
            raw_max=1.0,
            origin={
                "origin": "aet.AutoencoderEmbedder.fit",
                "features": n_features,
                "standardized": self.standardizer_ is not None,
            },
            default_test_fraction=0.0,  # no test part: every row trains or validates
        )
        try:  # the code size against X's width; the data sets' seeded cut, on X's rows
            config.model.check_input(image_shape)
            check_layer(config.model.architecture, self.score_layer)
            dataset = cut_dataset(
                "array",
                rows_read,
                seed=config.seed,
                test_fraction=None,
                val_fraction=config.val_fraction,
                limit=None,
            )
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        with tempfile.TemporaryDirectory(prefix="aet-embedder-") as run_dir:
            with torch.random.fork_rng(devices=[]):  # seeded initialisation, not the caller's
                trainer = config.trainer(dataset, Path(run_dir))
            self.history_ = trainer.fit()
            self.checkpoint_ = load_checkpoint(trainer.best_path)
        self.model_ = self.checkpoint_.build_model().eval()
        settings = ScoreSettings(
            density=self.score_density, neighbours=self.score_neighbours, layer=self.score_layer
        )
        train = np.asarray(dataset.train.x)
        self.novelty_ = NoveltyScore.fit(self.model_, train, settings, self.seed)
        self.embedding_dim_ = self._n_features_out = config.model.code_size
        # held-out rows in X's units: `export` calibrates the novelty score on them
        val = np.asarray(dataset.val.x).reshape(len(dataset.val.x), n_features)
        self.validation_rows_ = (
            val if self.standardizer_ is None else self.standardizer_.inverse_transform(val)
        )
        self.calibration_scores_ = np.sort(self._scores(val).astype(np.float64))
        return self

    def _scores(self, features: np.ndarray) -> np.ndarray:
        """The novelty score (N,) of rows already standardised (the graph's computation)."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        with torch.no_grad():
            parts = [
                self.novelty_(x[start : start + TRANSFORM_BATCH])[1]
                for start in range(0, len(x), TRANSFORM_BATCH)
            ]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)

    def novelty_score(self, X: ArrayLike) -> np.ndarray:
        """The novelty score of each row (higher: more unusual), as the exported graph's
        `reconstruction_error` output computes it.

        Returns
        -------
        ndarray of shape (n_samples,), float32
        """
        check_is_fitted(self, "model_")
        rows: np.ndarray = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._scores(self._features(rows))

    def score_samples(self, X: ArrayLike) -> np.ndarray:
        """The opposite of `novelty_score`: the lower, the more abnormal (scikit-learn's
        novelty convention, as `IsolationForest.score_samples`)."""
        return -self.novelty_score(X)

    def p_value(self, X: ArrayLike) -> np.ndarray:
        """Conformal p-values against the validation rows' scores:
        ``(1 + #{calibration >= score}) / (n + 1)``, float32 (n_samples,)."""
        check_is_fitted(self, "calibration_scores_")
        return p_values(self.calibration_scores_, self.novelty_score(X))

    @property
    def offset_(self) -> float:
        check_is_fitted(self, "calibration_scores_")
        return -threshold(self.calibration_scores_, self.alpha, self.contamination)

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for novel rows."""
        offset = self.offset_
        return self.score_samples(X).astype(np.float64) - offset

    def predict(self, X: ArrayLike) -> np.ndarray:
        """+1 for normal rows, -1 for novel ones (``decision_function < 0``)."""
        return np.where(self.decision_function(X) < 0, -1, 1).astype(np.int64)

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Embed the rows of `X` with the trained encoder.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)

        Returns
        -------
        ndarray of shape (n_samples, embedding_dim_), float32
        """
        check_is_fitted(self, "model_")
        rows: np.ndarray = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        features = torch.from_numpy(self._features(rows))
        with torch.no_grad():
            codes = [
                self.model_.encode(features[start : start + TRANSFORM_BATCH])
                for start in range(0, len(features), TRANSFORM_BATCH)
            ]
        return torch.cat(codes).numpy() if codes else np.zeros((0, self.embedding_dim_), np.float32)

    def export(self, repository: str | Path, name: str, opset: int = DEFAULT_OPSET) -> Path:
        """Write the encoder as the next version of `name` in the model repository.

        The graph takes raw feature rows (batch, n_features_in_) float32 and standardises them
        inside; it is parity-checked against PyTorch before anything is written.

        Returns
        -------
        Path
            The new version folder, ``<repository>/<name>/<version>``.
        """
        check_is_fitted(self, "model_")
        standardize = (
            torch.nn.Identity()
            if self.standardizer_ is None
            else StandardizeModule(self.standardizer_)
        )
        encoder = ExportedEncoder(self.model_, standardize, novelty=self.novelty_).eval()
        rng = np.random.default_rng(self.seed)
        shape = (PARITY_ROWS, self.n_features_in_)
        if self.standardizer_ is None:  # bce: features in [0, 1]
            inputs = rng.random(shape).astype(np.float32)
            preprocessing = []
        else:  # rows distributed like the training features, in their units
            inputs = self.standardizer_.inverse_transform(rng.standard_normal(shape))
            preprocessing = [
                f"standardize: (x - mean) / std per feature, {self.n_features_in_} features, "
                "statistics learned in AutoencoderEmbedder.fit"
            ]
        return export_encoder(
            encoder,
            inputs,
            self.validation_rows_,
            self.checkpoint_,
            Path(repository),
            name,
            opset=opset,
            input_name=VECTOR_INPUT_NAME,
            value_range=None if self.standardizer_ is not None else self.feature_range_,
            preprocessing=preprocessing,
            standardizer=None if self.standardizer_ is None else self.standardizer_.to_dict(),
        )
