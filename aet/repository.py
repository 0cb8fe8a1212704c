"""The model repository: `<root>/<model>/<version>/{model.onnx, model.json}`.

The floor that training (writes), the server and the clients (read) share. Writers go through
`write_version`: `aet export` (encoders), `aet head` (classifiers) and
`aet.AutoencoderEmbedder.export`. Readers go through `scan_repository`, which verifies every
version's sha256 (`check_sha256`, the one place the rule is checked) and reports the ones it
refuses, or `find_model_version` for one model folder.
Versions are positive integers, the highest usable one is "latest". A version folder appears
only by an atomic rename of a finished temporary folder, so readers never see half a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from aet.errors import UserError
from aet.files import remove_stale, temporary_folder

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION_PATTERN = re.compile(r"[1-9][0-9]*")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"
TENSOR_DTYPES = ("float32",)  # what graph inputs and outputs may be (uint8 requests are cast)


class RepositoryError(UserError):
    """A repository folder or model card is missing, invalid or cannot be written."""


@dataclass(frozen=True)
class InputSpec:
    """The graph input: one batch of `shape` (without the batch axis) in `value_range`."""

    name: str  # "pixels" for images, "features" for vectors
    shape: tuple[int, ...]  # (C, H, W) or (D,)
    dtype: str  # "float32"
    # (0, raw_max): the raw pixel range the graph expects; None for vectors (any finite value)
    value_range: tuple[float, float] | None
    feature_names: tuple[str, ...] | None = None  # vectors: the D features, in order


@dataclass(frozen=True)
class OutputSpec:
    """The graph output: one `embedding_dim` vector per input row (for a classifier: one
    probability per class, `embedding_dim` = the number of classes)."""

    name: str  # "embedding", or "probabilities" for a classifier
    dtype: str  # "float32"
    embedding_dim: int


SCORE_NAME = "reconstruction_error"  # the graph output and card field of the novelty score
SCORE_PERCENTILES = ("p50", "p90", "p99", "p99.9")
CALIBRATION_FILE = "calibration.npy"  # the validation rows' scores, sorted (ScoreSpec)


@dataclass(frozen=True)
class ScoreSpec:
    """The graph's second output: one novelty score per row (the reconstruction error), and
    its distribution on held-out rows, so a client can flag rows without labelled anomalies."""

    name: str  # "reconstruction_error"
    dtype: str  # "float32"
    measure: str  # what one number is, e.g. "mean binary cross-entropy per input value"
    calibration_split: str  # the rows the percentiles were measured on, e.g. "val"
    calibration_rows: int
    percentiles: dict[str, float]  # SCORE_PERCENTILES -> value
    # The calibration rows' scores, sorted, as float32 .npy beside the graph (conformal
    # p-values, `read_calibration`): the file name and its sha256; None for older versions.
    calibration_file: str | None = None
    calibration_sha256: str | None = None


@dataclass(frozen=True)
class ClassifierSpec:
    """What makes a model a classifier: its classes and the encoder its head was fitted on.

    The graph is preprocessing + encoder + head in one; its output (`probabilities`) holds
    one softmax probability per class, in the order of `labels`.
    """

    labels: tuple[str, ...]  # class names by index ("0", "1", ... when the data set has none)
    encoder: dict[str, Any]  # the exported encoder it was built on: name, version, sha256
    head: str  # "logreg", "mlp" or "fine-tune"
    settings: dict[str, Any]  # the head's fitted settings (e.g. C, standardise, hidden units)


@dataclass(frozen=True)
class ModelCard:
    """The contents of `model.json`: what the graph is, what it expects and where it came from."""

    name: str
    version: int
    architecture: str  # the model kind, e.g. "mlp", "stacked", "vae", "conv"
    hyperparameters: dict[str, Any]  # the model config that built the encoder
    input: InputSpec
    output: OutputSpec
    preprocessing: list[str]  # the steps baked into the graph, in order
    dataset: dict[str, Any]  # training data set: name, source and split
    metrics: dict[str, float]  # final metrics of the run, e.g. held-out reconstruction MSE
    opset: int
    sha256: str  # of model.onnx
    parity_max_abs_diff: float  # onnxruntime vs PyTorch, measured at export
    parity_samples: int  # rows that parity was measured on
    library_versions: dict[str, str]
    created: str  # ISO 8601 with time zone
    score: ScoreSpec | None = None  # None for graphs exported before the score existed
    standardizer: dict[str, Any] | None = None  # vectors: FeatureStandardizer.to_dict()
    classifier: ClassifierSpec | None = None  # set for classifier heads, absent for encoders

    @classmethod
    def draft(
        cls, name: str, architecture: str, input: InputSpec, output: OutputSpec, **fields: Any
    ) -> ModelCard:
        """The one card builder: a card for `write_version`, which stamps `version` and
        `sha256`; `created` is now, and fields not given are empty (no metrics, no parity
        samples beyond one, opset 1 unless given)."""
        values: dict[str, Any] = {
            "version": 1,
            "hyperparameters": {},
            "preprocessing": [],
            "dataset": {},
            "metrics": {},
            "opset": 1,
            "sha256": "0" * 64,
            "parity_max_abs_diff": 0.0,
            "parity_samples": 1,
            "library_versions": {},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return cls(
            name=name, architecture=architecture, input=input, output=output, **{**values, **fields}
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping written to `model.json` (encoders carry no `classifier`)."""
        data = dataclasses.asdict(self)
        if self.classifier is None:
            del data["classifier"]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = CARD_FILE) -> ModelCard:
        """Validate a parsed `model.json`; errors name `source` and the field. A field this
        schema does not know is refused by name (a card from a newer writer is not read
        half-understood)."""
        reader = _FieldReader(source)
        card = reader.known(reader.mapping(data, ""), cls, "")
        inp = reader.known(reader.mapping(reader.get(card, "input"), "input."), InputSpec, "input.")
        out = reader.known(
            reader.mapping(reader.get(card, "output"), "output."), OutputSpec, "output."
        )
        return cls(
            name=reader.model_name(card, "name"),
            version=reader.positive_int(card, "version"),
            architecture=reader.string(card, "architecture"),
            hyperparameters=reader.mapping(reader.get(card, "hyperparameters"), "hyperparameters"),
            input=InputSpec(
                name=reader.string(inp, "name", "input."),
                shape=reader.shape(inp, "shape", "input."),
                dtype=reader.choice(inp, "dtype", TENSOR_DTYPES, "input."),
                value_range=reader.value_range(inp, "value_range", "input."),
                feature_names=reader.optional_strings(inp, "feature_names", "input."),
            ),
            output=OutputSpec(
                name=reader.string(out, "name", "output."),
                dtype=reader.choice(out, "dtype", TENSOR_DTYPES, "output."),
                embedding_dim=reader.positive_int(out, "embedding_dim", "output."),
            ),
            preprocessing=reader.strings(card, "preprocessing"),
            dataset=reader.dataset(card, "dataset"),
            metrics=reader.metrics(card, "metrics"),
            opset=reader.positive_int(card, "opset"),
            sha256=reader.sha256(card, "sha256"),
            parity_max_abs_diff=reader.number(card, "parity_max_abs_diff"),
            parity_samples=reader.positive_int(card, "parity_samples"),
            library_versions=reader.library_versions(card, "library_versions"),
            created=reader.timestamp(card, "created"),
            score=reader.score(card, "score"),
            standardizer=reader.optional_mapping(card, "standardizer"),
            classifier=reader.classifier(card, "classifier", out),
        )


class _FieldReader:
    """Type checks for `ModelCard.from_dict`, raising `RepositoryError` naming file and field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, expected: str, value: Any) -> RepositoryError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return RepositoryError(f"{self.source}: field {path!r}: expected {expected}, got {shown}")

    def get(self, data: dict, key: str, prefix: str = "") -> Any:
        if key not in data:
            raise RepositoryError(f"{self.source}: missing field {prefix + key!r}")
        return data[key]

    def mapping(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path or "<top level>", "a JSON object", value)
        return value

    def string(self, data: dict, key: str, prefix: str = "") -> str:
        value = self.get(data, key, prefix)
        if not isinstance(value, str) or not value:
            raise self.fail(prefix + key, "a non-empty string", value)
        return value

    def known(self, data: dict, schema: type, prefix: str) -> dict:
        """`data`, unless it holds a key that is no field of the dataclass `schema`."""
        fields = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise RepositoryError(
                f"{self.source}: unknown field {prefix + unknown[0]!r}: expected only "
                f"{', '.join(sorted(fields))}"
            )
        return data

    def choice(self, data: dict, key: str, choices: tuple[str, ...], prefix: str = "") -> str:
        value = self.get(data, key, prefix)
        if value not in choices:
            raise self.fail(prefix + key, f"one of {', '.join(map(repr, choices))}", value)
        return value

    def model_name(self, data: dict, key: str, prefix: str = "") -> str:
        value = self.get(data, key, prefix)
        if not isinstance(value, str) or not MODEL_NAME_PATTERN.fullmatch(value):
            raise self.fail(
                prefix + key, f"a model name matching {MODEL_NAME_PATTERN.pattern}", value
            )
        return value

    def positive_int(self, data: dict, key: str, prefix: str = "") -> int:
        value = self.get(data, key, prefix)
        if not _is_int(value) or value < 1:
            raise self.fail(prefix + key, "a positive integer", value)
        return value

    def number(self, data: dict, key: str, prefix: str = "") -> float:
        value = self.get(data, key, prefix)
        if not _is_number(value):
            raise self.fail(prefix + key, "a number", value)
        return float(value)

    def shape(self, data: dict, key: str, prefix: str) -> tuple[int, ...]:
        value = self.get(data, key, prefix)
        if not isinstance(value, list) or not value or not all(_is_int(d) and d > 0 for d in value):
            raise self.fail(prefix + key, "a non-empty list of positive integers", value)
        return tuple(value)

    def value_range(self, data: dict, key: str, prefix: str) -> tuple[float, float] | None:
        value = self.get(data, key, prefix)
        if value is None:  # vectors: any finite value
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(map(_is_number, value))
            or not value[0] < value[1]
        ):
            raise self.fail(prefix + key, "[low, high] with low < high", value)
        return float(value[0]), float(value[1])

    def strings(self, data: dict, key: str) -> list[str]:
        value = self.get(data, key)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise self.fail(key, "a list of strings", value)
        return list(value)

    def optional_strings(self, data: dict, key: str, prefix: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise self.fail(prefix + key, "a list of strings or null", value)
        return tuple(value)

    def optional_mapping(self, data: dict, key: str) -> dict | None:
        value = data.get(key)
        return None if value is None else self.mapping(value, key)

    def score(self, data: dict, key: str) -> ScoreSpec | None:
        value = self.optional_mapping(data, key)
        if value is None:
            return None
        prefix = key + "."
        self.known(value, ScoreSpec, prefix)
        percentiles = self.mapping(self.get(value, "percentiles", prefix), prefix + "percentiles")
        for name in SCORE_PERCENTILES:
            self.number(percentiles, name, prefix + "percentiles.")
        return ScoreSpec(
            name=self.string(value, "name", prefix),
            dtype=self.choice(value, "dtype", TENSOR_DTYPES, prefix),
            measure=self.string(value, "measure", prefix),
            calibration_split=self.string(value, "calibration_split", prefix),
            calibration_rows=self.positive_int(value, "calibration_rows", prefix),
            percentiles={name: float(percentiles[name]) for name in SCORE_PERCENTILES},
            calibration_file=self.calibration_file(value, "calibration_file", prefix),
            calibration_sha256=(
                None
                if value.get("calibration_sha256") is None
                else self.sha256(value, "calibration_sha256", prefix)
            ),
        )

    def calibration_file(self, data: dict, key: str, prefix: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if value != CALIBRATION_FILE:
            raise self.fail(prefix + key, repr(CALIBRATION_FILE), value)
        if data.get("calibration_sha256") is None:
            raise RepositoryError(
                f"{self.source}: field {prefix}calibration_sha256 is missing beside {prefix + key}"
            )
        return value

    def dataset(self, data: dict, key: str) -> dict[str, Any]:
        value = self.mapping(self.get(data, key), key)
        self.string(value, "name", key + ".")
        return value

    def metrics(self, data: dict, key: str) -> dict[str, float]:
        value = self.mapping(self.get(data, key), key)
        for name, number in value.items():
            if not _is_number(number):
                raise self.fail(f"{key}.{name}", "a number", number)
        return {name: float(number) for name, number in value.items()}

    def sha256(self, data: dict, key: str, prefix: str = "") -> str:
        value = self.get(data, key, prefix)
        if not isinstance(value, str) or not _SHA256_PATTERN.fullmatch(value):
            raise self.fail(prefix + key, "64 lowercase hex digits", value)
        return value

    def library_versions(self, data: dict, key: str) -> dict[str, str]:
        value = self.mapping(self.get(data, key), key)
        for name, version in value.items():
            if not isinstance(version, str):
                raise self.fail(f"{key}.{name}", "a version string", version)
        return dict(value)

    def classifier(self, data: dict, key: str, output: dict) -> ClassifierSpec | None:
        if key not in data:
            return None
        value = self.known(self.mapping(data[key], key), ClassifierSpec, key + ".")
        labels = self.get(value, "labels", key + ".")
        if not isinstance(labels, list) or not all(isinstance(s, str) and s for s in labels):
            raise self.fail(f"{key}.labels", "a list of non-empty strings", labels)
        if len(labels) != output.get("embedding_dim"):
            raise self.fail(
                f"{key}.labels",
                f"one label per output column ({output.get('embedding_dim')})",
                labels,
            )
        encoder = self.mapping(self.get(value, "encoder", key + "."), f"{key}.encoder")
        self.model_name(encoder, "name", f"{key}.encoder.")
        self.positive_int(encoder, "version", f"{key}.encoder.")
        self.sha256(encoder, "sha256", f"{key}.encoder.")
        return ClassifierSpec(
            labels=tuple(labels),
            encoder=encoder,
            head=self.string(value, "head", key + "."),
            settings=self.mapping(self.get(value, "settings", key + "."), f"{key}.settings"),
        )

    def timestamp(self, data: dict, key: str) -> str:
        value = self.string(data, key)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise self.fail(key, "an ISO 8601 time with a time zone", value)
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelVersion:
    """One `<model>/<version>/` folder as found by `scan_repository`.

    `error` is None when the version is usable; otherwise it says why it was refused
    (unreadable card, card naming another model or version, missing model, sha256 mismatch)
    and `card` may be None.
    """

    name: str
    version: int
    path: Path
    card: ModelCard | None = None
    error: str | None = None
    fingerprint: tuple = ()  # (name, size, mtime, inode) of each file, taken before reading them

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "refused"

    @property
    def usable_card(self) -> ModelCard:
        """The card of a usable version; a refused one raises RepositoryError with its reason."""
        if self.error is not None or self.card is None:
            raise RepositoryError(f"{self.name}/{self.version}: refused: {self.error}")
        return self.card

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    def verified_bytes(self) -> bytes:
        """The model's bytes, checked against the card again (a file changed since the scan
        is refused)."""
        data = self.model_path.read_bytes()
        check_sha256(data, self.usable_card, str(self.model_path))
        return data


def check_sha256(onnx_bytes: bytes, card: ModelCard, source: str) -> None:
    """The sha256 rule, the one place it is checked: a model's bytes must hash to its card's
    `sha256`; otherwise RepositoryError naming `source` and both digests."""
    actual = hashlib.sha256(onnx_bytes).hexdigest()
    if actual != card.sha256:
        raise RepositoryError(
            f"{source}: sha256 mismatch: card expects {card.sha256}, file has {actual}"
        )


def read_model_card(path: str | os.PathLike, source: str | None = None) -> ModelCard:
    """Read and validate one `model.json`; `RepositoryError` names the file (as `source`, when
    given, e.g. a path relative to the repository) and the field."""
    source = str(path) if source is None else source
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RepositoryError(f"cannot read model card {source}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{source}: not valid JSON: {exc}") from exc
    return ModelCard.from_dict(data, source=source)


def validate_model_name(name: str) -> str:
    """Return `name` if it is a valid model folder name, else raise `RepositoryError`."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        raise RepositoryError(
            f"model name: expected letters, digits, '_', '.' or '-' starting with a letter or "
            f"digit ({MODEL_NAME_PATTERN.pattern}), got {name!r}"
        )
    return name


def _version_numbers(model_dir: Path) -> list[int]:
    """Version folder numbers under `model_dir`, ignoring hidden, temporary and other entries."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if entry.is_dir() and _VERSION_PATTERN.fullmatch(entry.name)
    )


def next_version(root: str | os.PathLike, name: str) -> int:
    """The version number the next export of `name` gets: one above the highest, or 1."""
    versions = _version_numbers(Path(root) / validate_model_name(name))
    return versions[-1] + 1 if versions else 1


def write_version(
    root: str | os.PathLike,
    name: str,
    model: bytes | str | os.PathLike,
    card: ModelCard,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `model` (ONNX bytes or a file) and its card as the next version of `name`;
    `extra_files` (name -> bytes, e.g. `CALIBRATION_FILE`) go into the same folder.

    The card's `version` and `sha256` are stamped here (next free version, digest of the bytes
    written). Files are written into a hidden temporary folder beside the versions and renamed
    into place, so a failure leaves no version behind and an existing version is never
    replaced; if another writer takes the number first, the next one is used. Returns the new
    version folder.
    """
    validate_model_name(name)
    if card.name != name:
        raise RepositoryError(f"model card name: expected {name!r}, got {card.name!r}")
    onnx_bytes = model if isinstance(model, bytes) else _read_bytes(Path(model))
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    model_dir = Path(root) / name
    created = not model_dir.exists()
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(model_dir, _TEMP_PREFIX)  # staging folders of writers killed mid-way
        staging = temporary_folder(model_dir, _TEMP_PREFIX)
    except OSError as exc:
        raise RepositoryError(
            f"cannot write to model repository folder {model_dir}: {exc.strerror or exc}"
        ) from exc
    try:
        _write_file(staging / MODEL_FILE, onnx_bytes)
        for file_name, data in (extra_files or {}).items():
            _write_file(staging / file_name, data)
        version = next_version(root, name)
        while True:
            target = model_dir / str(version)
            if not target.exists():
                stamped = dataclasses.replace(card, version=version, sha256=digest)
                _write_file(staging / CARD_FILE, _card_json(stamped).encode("utf-8"))
                try:
                    os.rename(staging, target)
                except OSError:
                    if not target.exists():
                        raise
                else:
                    _fsync_dir(model_dir)
                    return target
            # Another writer took this number first (or something else sits there): move on.
            version = max(version + 1, next_version(root, name))
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # not when another writer has put a version there
                model_dir.rmdir()
        raise RepositoryError(
            f"cannot write model version under {model_dir}: {exc.strerror or exc}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def calibration_bytes(scores: np.ndarray) -> bytes:
    """`CALIBRATION_FILE`'s bytes: the scores as a sorted float32 .npy."""
    buffer = io.BytesIO()
    np.save(buffer, np.sort(np.asarray(scores, dtype=np.float32).ravel()), allow_pickle=False)
    return buffer.getvalue()


def read_calibration(version_dir: str | os.PathLike, card: ModelCard) -> np.ndarray | None:
    """The sorted calibration scores of a version (None when its card has none), after
    checking the file against the card's `score.calibration_sha256`."""
    score = card.score
    if score is None or score.calibration_file is None:
        return None
    path = Path(version_dir) / score.calibration_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RepositoryError(
            f"cannot read calibration scores {path}: {exc.strerror or exc}"
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != score.calibration_sha256:
        raise RepositoryError(
            f"{path}: sha256 mismatch: card expects {score.calibration_sha256}, file has {actual}"
        )
    try:
        scores = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise RepositoryError(f"{path}: not a .npy array ({exc})") from exc
    if scores.ndim != 1 or len(scores) != score.calibration_rows:
        raise RepositoryError(
            f"{path}: expected {score.calibration_rows} scores, got shape {scores.shape}"
        )
    return np.sort(scores.astype(np.float64))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RepositoryError(f"cannot read ONNX model {path}: {exc.strerror or exc}") from exc


def _card_json(card: ModelCard) -> str:
    return json.dumps(card.to_dict(), indent=2) + "\n"


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_version(name: str, version: int, path: Path) -> ModelVersion:
    """Read one version folder's card and verify it against the folder and the model bytes.

    Reasons name files relative to the repository (`<model>/<version>/model.json`): they are
    shown to clients, who have no business knowing where the repository lives.
    """
    card_file, model_file = f"{name}/{version}/{CARD_FILE}", f"{name}/{version}/{MODEL_FILE}"
    fingerprint = folder_fingerprint(path)

    def refused(reason: str, card: ModelCard | None = None) -> ModelVersion:
        return ModelVersion(name, version, path, card, reason, fingerprint)

    try:
        card = read_model_card(path / CARD_FILE, card_file)
    except RepositoryError as exc:
        return refused(str(exc))
    if (card.name, card.version) != (name, version):
        return refused(
            f"{card_file}: card says {card.name}/{card.version}, folder is {name}/{version}", card
        )
    try:
        check_sha256((path / MODEL_FILE).read_bytes(), card, model_file)
    except OSError as exc:
        return refused(f"cannot read {model_file}: {exc.strerror or exc}", card)
    except RepositoryError as exc:
        return refused(str(exc), card)
    return ModelVersion(name, version, path, card, fingerprint=fingerprint)


def folder_fingerprint(path: Path) -> tuple:
    """(name, size, mtime in ns, inode) of every file in `path`: changes when a file is added,
    removed, rewritten or replaced, so a refused version is retried, and a served one verified
    again, only when its folder changed."""
    try:
        stats = [(e.name, e.stat()) for e in sorted(path.iterdir())]
        return tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in stats)
    except OSError:
        return ()


def scan_repository(root: str | os.PathLike) -> list[ModelVersion]:
    """Every version under `root`, sorted by model name then version, each verified.

    Usable versions have `ok` True; refused ones carry the reason in `error` and do not stop
    the others from being listed. Hidden and temporary folders, files, folders that are not
    valid model names and version folders that are not positive integers are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root}: not a directory")
    found = []
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not MODEL_NAME_PATTERN.fullmatch(model_dir.name):
            continue
        for version in _version_numbers(model_dir):
            found.append(_check_version(model_dir.name, version, model_dir / str(version)))
    return found


def latest_version(versions: Iterable[ModelVersion], name: str) -> ModelVersion | None:
    """The highest-numbered usable version of `name` among `versions`, or None."""
    usable = [v for v in versions if v.name == name and v.ok]
    return max(usable, key=lambda v: v.version, default=None)


def find_model_version(path: str | os.PathLike) -> ModelVersion:
    """The verified version at `exported/<model>/<version>`, or the latest of `exported/<model>`."""
    path = Path(path)
    if (path / CARD_FILE).exists():
        root, name, wanted = path.parent.parent, path.parent.name, path.name
    else:
        root, name, wanted = path.parent, path.name, None
    if not (root / name).is_dir():
        raise RepositoryError(
            f"model folder {path}: no such folder; expected "
            f"exported/<model> or exported/<model>/<version>"
        )
    versions = [v for v in scan_repository(root) if v.name == name]
    if wanted is not None:
        found = next((v for v in versions if str(v.version) == wanted), None)
        if found is None:
            raise RepositoryError(
                f"model folder {path}: expected a positive integer version folder, got {wanted!r}"
            )
        if not found.ok:
            raise RepositoryError(f"model folder {path}: refused: {found.error}")
        return found
    found = latest_version(versions, name)
    if found is None:
        reasons = "; ".join(f"v{v.version}: {v.error}" for v in versions) or "no version folders"
        raise RepositoryError(f"model folder {path}: no usable version ({reasons})")
    return found
