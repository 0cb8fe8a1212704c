"""Fair probes of frozen features: every feature set gets the same tuning, on its labels only.

A probe learns from a labelled subset of the training rows and is scored on the test split. Its
settings are chosen per feature set by stratified cross-validation on that labelled subset alone
(the test split is never looked at), so that raw pixels and PCA codes get the same care as the
embedding:

- `logistic_probe`: logistic regression; the inverse regularisation `C` and whether to
  standardise the features first (which hurts raw pixels and PCA scores with few labels).
- `knn_probe`: k-nearest neighbours (Euclidean); `k` and whether to standardise. It needs no
  training, so it checks the geometry of the embedding itself.

`probe_features` runs both on every (feature set, label budget), on the same stratified label
subsets (`label_subset`), and reports the chosen settings beside each accuracy. Used by
`aet pretrain`'s evaluation, `aet probe` and `aet demo`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from aet.config import ConfigError

LOGISTIC_C = tuple(float(c) for c in np.logspace(-4, 2, 7))  # 1e-4 ... 100, one per decade
KNN_K = (1, 3, 5, 9, 15, 25)
MAX_FOLDS = 5
LARGE_SUBSET = 2000  # above this many labels 3 folds are plenty (and 40 % cheaper than 5)


def label_subset(y: np.ndarray, n_labels: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of `n_labels` examples (all if None or more).

    Raises ConfigError when `n_labels` is smaller than the number of classes.
    """
    if n_labels is None or n_labels >= len(y):
        return np.arange(len(y))
    n_classes = len(np.unique(y))
    if n_labels < n_classes:
        raise ConfigError(
            f"probe labels: expected at least one label per class ({n_classes}); got {n_labels}"
        )
    chosen, _ = train_test_split(
        np.arange(len(y)), train_size=n_labels, stratify=y, random_state=seed
    )
    return np.sort(chosen)


@dataclass(frozen=True)
class ProbeScore:
    """Test accuracy of one probe, with the settings cross-validation chose for it.

    `settings` names the tuned hyper-parameters (`C` or `k`, and `standardise`);
    `cv_accuracy` is their mean accuracy over the folds (None: too few labels to cross-validate,
    so the defaults were used).
    """

    accuracy: float
    settings: dict
    cv_accuracy: float | None
    folds: int

    def choice(self) -> dict:
        """What was chosen and how (JSON-serialisable): everything but the test accuracy."""
        return {k: v for k, v in asdict(self).items() if k != "accuracy"}


def _folds(y: np.ndarray, seed: int) -> StratifiedKFold | None:
    """Stratified folds over the labelled subset, or None when a class has a single label."""
    smallest = int(np.bincount(y)[np.unique(y)].min())
    if smallest < 2:
        return None
    n_splits = min(MAX_FOLDS if len(y) <= LARGE_SUBSET else 3, smallest)
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


@dataclass(frozen=True)
class TunedModel:
    """A `scale -> estimator` pipeline refitted on all the labelled rows with the settings
    cross-validation chose (see `ProbeScore` for `settings`, `cv_accuracy` and `folds`)."""

    model: Pipeline
    settings: dict
    cv_accuracy: float | None
    folds: int


def _tune(
    estimator,
    grid: Mapping[str, tuple],
    names: Mapping[str, str],
    defaults: Mapping[str, object],
    train_x: np.ndarray,
    train_y: np.ndarray,
    seed: int,
) -> TunedModel:
    """Fit `scale -> estimator`, choosing `grid` and standardise-or-not by CV on the train rows.

    `names` maps grid keys (e.g. `clf__C`) to the names reported in `settings` (e.g. `C`);
    `defaults` (grid key -> value) serve, without standardising, when a class has one label.
    """
    pipeline = Pipeline([("scale", "passthrough"), ("clf", estimator)])
    folds = _folds(train_y, seed)
    # These problems are small for BLAS: its threads spin against each other and any other load
    # (measured: a logistic fit on 1,000 MNIST rows 20x slower with 2 OpenBLAS threads).
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        # lbfgs stopping at max_iter on a hard (C, fold) pair only lowers that pair's CV score.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds is None:
            fitted = pipeline.set_params(**defaults).fit(train_x, train_y)
            settings = {"standardise": False, **{names[k]: v for k, v in defaults.items()}}
            return TunedModel(fitted, settings, None, 0)
        search = GridSearchCV(
            pipeline,
            {"scale": ["passthrough", StandardScaler()], **{k: list(v) for k, v in grid.items()}},
            cv=folds,
            scoring="accuracy",
        ).fit(train_x, train_y)
    chosen = search.best_params_
    settings = {
        "standardise": chosen["scale"] != "passthrough",
        **{names[k]: _plain(chosen[k]) for k in grid},
    }
    return TunedModel(search.best_estimator_, settings, float(search.best_score_), folds.n_splits)


def _score(tuned: TunedModel, test_x: np.ndarray, test_y: np.ndarray) -> ProbeScore:
    with threadpool_limits(limits=1, user_api="blas"):
        accuracy = float(tuned.model.score(test_x, test_y))
    return ProbeScore(accuracy, tuned.settings, tuned.cv_accuracy, tuned.folds)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def logistic_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
) -> ProbeScore:
    """Logistic regression on features (N, D); C and standardisation chosen by stratified CV."""
    return _score(tune_logistic(train_x, train_y, seed), test_x, test_y)


def tune_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> TunedModel:
    """The logistic probe's model itself (what `aet head` exports): C and standardisation
    chosen by stratified CV on (train_x, train_y), then refitted on all of them."""
    estimator = LogisticRegression(max_iter=500, tol=1e-3, random_state=seed)
    grid = {"clf__C": LOGISTIC_C}
    return _tune(estimator, grid, {"clf__C": "C"}, {"clf__C": 1.0}, train_x, train_y, seed)


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
) -> ProbeScore:
    """k-nearest neighbours (Euclidean) on features (N, D); k and standardisation chosen by CV.

    Only values of k that every training fold can supply are tried.
    """
    folds = _folds(train_y, seed)
    smallest_fold = (
        len(train_y) if folds is None else len(train_y) * (folds.n_splits - 1) // folds.n_splits
    )
    ks = tuple(k for k in KNN_K if k <= smallest_fold) or (1,)
    grid = {"clf__n_neighbors": ks}
    tuned = _tune(
        KNeighborsClassifier(),
        grid,
        {"clf__n_neighbors": "k"},
        {"clf__n_neighbors": 1},
        train_x,
        train_y,
        seed,
    )
    return _score(tuned, test_x, test_y)


Probe = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], ProbeScore]
PROBE_FUNCTIONS: dict[str, Probe] = {"logreg": logistic_probe, "knn": knn_probe}


@dataclass(frozen=True)
class FeatureSet:
    """One representation of the labelled fit rows (train + val) and of the test rows."""

    name: str
    fit: np.ndarray  # (N_fit, D)
    test: np.ndarray  # (N_test, D)


def probe_features(
    features: list[FeatureSet],
    fit_y: np.ndarray,
    test_y: np.ndarray,
    label_counts: list[int],
    seed: int = 0,
    probes: Mapping[str, Probe] = PROBE_FUNCTIONS,
) -> dict:
    """Every probe on every feature set for every label budget, on shared label subsets: the
    one probe loop of `aet pretrain`'s evaluation, `aet probe` and `aet demo`.

    Returns a JSON-serialisable dict: `labels` (the budgets), `accuracy` as
    `{feature name: {probe name: [accuracy per budget]}}` and `settings` in the same layout
    (`ProbeScore.choice()`: the chosen hyper-parameters, the CV accuracy, the folds).
    """
    subsets = [label_subset(fit_y, n, seed) for n in label_counts]
    accuracy: dict[str, dict[str, list[float]]] = {}
    settings: dict[str, dict[str, list[dict]]] = {}
    for feature in features:
        accuracy[feature.name], settings[feature.name] = {}, {}
        for name, probe in probes.items():
            scores = [
                probe(feature.fit[index], fit_y[index], feature.test, test_y, seed)
                for index in subsets
            ]
            accuracy[feature.name][name] = [score.accuracy for score in scores]
            settings[feature.name][name] = [score.choice() for score in scores]
    return {"labels": [len(index) for index in subsets], "accuracy": accuracy, "settings": settings}


def format_settings(settings: dict) -> str:
    """`C=0.01, standardised` / `k=5, raw` (or `defaults`): one probe's chosen settings, short."""
    tuned = ", ".join(f"{k}={v:g}" for k, v in settings["settings"].items() if k != "standardise")
    scaling = "standardised" if settings["settings"]["standardise"] else "raw"
    suffix = "" if settings["cv_accuracy"] is not None else ", defaults: too few labels for CV"
    return f"{tuned}, {scaling}{suffix}"
