"""`DataSpec`: which rows a command works on, declared once for every command and model.json.

The data set, how to read it (path, table columns, label column, missing values, image size) and
how to split it (seed, fractions, limit). Every command takes these fields as the same flags
(`aet.config` turns the group into `--dataset`, `--data-path`, ...); `aet pretrain` records them
in the run, `aet export` in model.json (`dataset`), `aet embed` in its output. A field left
unset (None) takes its default (`with_defaults`), or, for a command that runs an exported model,
the value recorded in the model's card (`resolve_against`): the leak-proof rule by which
`aet probe` and `aet head` score on rows the encoder never trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aet.errors import UserError
from aet.repository import find_model_version
from aet.training.data import DATASETS, Dataset, load_dataset

SPLIT_MISMATCH = "split differs from pretraining"
# Fields a command may leave unset, and what they are then (without a model card).
DEFAULTS: dict[str, Any] = dict(dataset="digits", seed=0, val_fraction=0.1, drop_missing=False)


class SplitMismatch(UserError):
    """A given data flag changes the rows of the model's pretraining split, or its data is gone."""


def _option(help_text: str, **metadata: Any) -> Any:
    """A `DataSpec` field: unset (None) unless given; its flag's help text."""
    return field(default=None, metadata={"help": help_text, **metadata})


@dataclass(frozen=True)
class DataSpec:
    """The rows a command reads: data set, reading options and seeded split."""

    dataset: str | None = _option(
        "data set (default: digits; with a model: the one model.json records)",
        choices=sorted(DATASETS),
    )
    data_path: Path | None = _option(
        "file or folder of the data set (mnist-idx, npz, image-folder, csv, parquet)"
    )
    columns: list[str] | None = _option(
        "feature columns of a table (csv, parquet, 2-D npz: x0 x1 ...; "
        "default: every column but the label)"
    )
    label_column: str | None = _option("class label column of a table (default: unlabelled)")
    drop_missing: bool | None = _option(
        "drop table rows with a missing or infinite value (default: fail naming each column)"
    )
    image_size: int | None = _option("resize image-folder images to this square (default: 28)")
    seed: int | None = _option(
        "seed of the split, and of the command's training, label subsets and probes (default: 0)"
    )
    test_fraction: float | None = _option(
        "held-out test fraction (default: the data set's own test files or default fraction)"
    )
    val_fraction: float | None = _option("validation fraction of the rest (default: 0.1)")
    limit: int | None = _option("use only this many rows, a seeded subset (default: all)")

    def given(self) -> dict[str, Any]:
        """The fields set (not None), by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def with_defaults(self) -> DataSpec:
        """Unset fields at their defaults (`DEFAULTS`)."""
        return dataclasses.replace(
            self, **{k: v for k, v in DEFAULTS.items() if getattr(self, k) is None}
        )

    @property
    def name(self) -> str:
        """The data set's name (`dataset`, or its default)."""
        return self.dataset or DEFAULTS["dataset"]

    def load(self) -> Dataset:
        """The data set and split these settings name (unset fields at their defaults)."""
        spec = self.with_defaults()
        assert spec.seed is not None and spec.val_fraction is not None  # with_defaults
        return load_dataset(
            spec.name,
            spec.data_path,
            seed=spec.seed,
            test_fraction=spec.test_fraction,
            val_fraction=spec.val_fraction,
            image_size=spec.image_size,
            limit=spec.limit,
            columns=spec.columns,
            label_column=spec.label_column,
            drop_missing=bool(spec.drop_missing),
        )

    def record(self) -> dict[str, Any]:
        """The settings as JSON (what an `aet embed` output and a job manifest record):
        name, path, seed and fractions always, reading options when given."""
        spec = self.with_defaults()
        recorded: dict[str, Any] = {
            "name": spec.name,
            "path": None if spec.data_path is None else str(spec.data_path),
            "seed": spec.seed,
            "test_fraction": spec.test_fraction,
            "val_fraction": spec.val_fraction,
            "limit": spec.limit,
        }
        for name in ("columns", "label_column", "drop_missing", "image_size"):
            if getattr(spec, name):  # image data sets take no table options, and vice versa
                recorded[name] = getattr(spec, name)
        return recorded

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> DataSpec:
        """Settings read back from `record()` or from a data set's `source` (model.json's
        `dataset`; "official" test fraction: the data set's own test files)."""
        test_fraction = recorded.get("test_fraction")
        path = recorded.get("path")
        return cls(
            dataset=recorded["name"],
            data_path=None if path is None else Path(path),
            columns=None if recorded.get("columns") is None else list(recorded["columns"]),
            label_column=recorded.get("label_column"),
            drop_missing=bool(recorded.get("drop_missing", False)),
            image_size=recorded.get("image_size"),
            seed=recorded.get("seed", 0),
            test_fraction=None if test_fraction == "official" else test_fraction,
            val_fraction=recorded.get("val_fraction", 0.1),
            limit=recorded.get("limit"),
        )

    def resolve_against(
        self, recorded: dict[str, Any], card_path: Path, *, allow_mismatch: bool
    ) -> tuple[DataSpec, str | None]:
        """These settings with every unset field taken from a model card's `dataset` record
        (read from `card_path`), and a note naming each given field that changes the rows.

        A change is refused (`SplitMismatch`) unless `allow_mismatch`: the test rows would then
        include rows the model was pretrained on. The data path may differ (data move); a
        recorded path that no longer exists must be given again. A card from data outside the
        registry (`aet.AutoencoderEmbedder`) contributes nothing.
        """
        if recorded.get("name") not in DATASETS:
            return self, None
        card = DataSpec.from_record(recorded)
        differences = [
            f"--{name.replace('_', '-')} {value} (pretraining: {getattr(card, name)})"
            for name, value in self.given().items()
            if name != "data_path" and value != getattr(card, name)
        ]
        if differences and not allow_mismatch:
            raise SplitMismatch(
                f"{card_path}: {SPLIT_MISMATCH}: {', '.join(differences)}; the test rows "
                f"would include rows the encoder was pretrained on. Leave these flags out to use "
                f"model.json's split, or pass --allow-split-mismatch to go on anyway"
            )
        resolved = dataclasses.replace(card, **self.given())
        if self.data_path is None and resolved.dataset != card.dataset:
            resolved = dataclasses.replace(resolved, data_path=None)  # another data set's path
        elif self.data_path is None and card.data_path and not card.data_path.exists():
            raise SplitMismatch(
                f"{card_path}: records data path {card.data_path}, which no longer exists; "
                f"pass --data-path with the data the model was pretrained on"
            )
        note = f"{SPLIT_MISMATCH}: {', '.join(differences)}" if differences else None
        return resolved, note


def resolve_data(
    spec: DataSpec, model_dir: Path, *, allow_mismatch: bool
) -> tuple[DataSpec, str | None]:
    """`spec` resolved against the model card of `exported/<model>[/<version>]` (its verified
    latest version by default): `DataSpec.resolve_against` on the card's `dataset`."""
    found = find_model_version(model_dir)
    return spec.resolve_against(
        found.usable_card.dataset, found.card_path, allow_mismatch=allow_mismatch
    )
