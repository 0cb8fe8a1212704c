"""Novelty detection, side by side: the autoencoder's served score against classical detectors.

    python bench/novelty.py --threads 1              # every protocol, ten MNIST digits
    python bench/novelty.py --quick --threads 1      # digits 2 and 8, 20 epochs (the tests run it)
    python bench/novelty.py --protocol table --data-path my.csv --label-column kind \
        --normal ok,fine                             # your own table: normal classes named

Protocols (each on one seeded, stratified 70 / 30 split of all its rows; every method is fitted
on the same normal rows of the 70 % and scored on the same 30 %, AUROC of "novel"):
- `mnist`: one-class MNIST on the MNIST test set (`../shared/data/mnist`, t10k): for each digit
  c, the normal rows are c's; every other digit is novel (Ruff et al. 2018, but test-set only).
- `optdigits`: scikit-learn's 8x8 digits as ODDS' "optdigits": digits 1-9 normal, 0 novel.
- `wbc`: breast-cancer as ODDS' "wbc": benign normal, malignant novel.
- `wine`: classes 0 and 1 normal, class 2 novel.
- `table`: any csv / parquet / npz (`--data-path`, `--label-column`, `--normal`).

Methods: `autoencoder` is the score the exported graph serves (`training.novelty.NoveltyScore`,
the module `aet export` writes, parity-checked against onnxruntime there) of an autoencoder
trained as `aet pretrain --recipe novelty` trains one (for optdigits with `--code-size 8`,
exported with `--score-layer hidden`), or an MLP sized by the table's width D (tables: hidden 2 D
and D, ELU, code D / 4, trained by the `gaussian` loss: a decoder that also predicts each
value's variance); `ae-recon` its reconstruction term alone; for images `ae-unsmoothed` that
term without its smoothing and `ae-bce` the mean binary cross-entropy served first.
Baselines (scikit-learn, set without test labels): PCA reconstruction error (components
explaining 90 % of the variance of the normal training rows), IsolationForest (200 trees),
OneClassSVM (gamma "scale", nu 0.1), LocalOutlierFactor(novelty=True) (20 neighbours), and the
mean distance to the 5 nearest normal training rows. Images enter baselines as pixels in [0, 1],
tables standardised with the normal training rows' statistics.

Writes bench/results/novelty.{json,md} (or --output) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]  # runnable from a checkout without installing

import torch  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.ensemble import IsolationForest  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors  # noqa: E402
from sklearn.svm import OneClassSVM  # noqa: E402

from aet.errors import UserError  # noqa: E402
from aet.sklearn import AutoencoderEmbedder  # noqa: E402
from aet.training.data import DATASETS, TableOptions, default_mnist_dir  # noqa: E402
from aet.training.models import reconstruction_error  # noqa: E402
from aet.training.novelty import DENSITY_LAYERS, NoveltyScore, ScoreSettings  # noqa: E402
from aet.training.recipes import load_recipe  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROTOCOLS = ("mnist", "optdigits", "wbc", "wine")
BASELINES = ("pca", "iforest", "ocsvm", "lof", "knn")
IMAGE_RECIPE = load_recipe("novelty")  # the image autoencoder: `aet pretrain --recipe novelty`
# Per image protocol: the code size its autoencoder trains with (`--code-size C`) and the layer
# its score's density term reads (`aet export --score-layer L`), as docs/novelty.md says.
IMAGE_PROTOCOLS = {"mnist": (IMAGE_RECIPE["code_size"], "code"), "optdigits": (8, "hidden")}
TABLE_EPOCHS = 120
TRAIN_FRACTION = 0.7


def table_autoencoder(width: int, epochs: int) -> dict[str, object]:
    """The table autoencoder's hyper-parameters (`AutoencoderEmbedder` names) for `width`
    features: hidden 2 D and D with ELU, code D / 4, no noise, and the `gaussian` loss (a
    decoder that also predicts each value's variance; the score reads its mean).
    docs/vectors.md gives them as `aet pretrain` flags, and a test holds the two together."""
    return {
        "architecture": "mlp",
        "hidden_sizes": (max(8, 2 * width), max(4, width)),
        "code_size": max(2, width // 4),
        "activation": "elu",
        "loss": "gaussian",
        "noise": "none",
        "epochs": epochs,
        "patience": max(5, epochs // 4),
        "batch_size": 32,
    }


class BenchError(UserError):
    """A protocol cannot be built from the data given."""


@dataclass(frozen=True)
class Rows:
    """All rows of a data set: x (N, D) float32 (images flattened, in [0, 1]), y (N,) labels,
    `image_shape` (C, H, W) for images, None for feature vectors."""

    x: np.ndarray
    y: np.ndarray
    image_shape: tuple[int, ...] | None
    classes: list[str]  # label index -> name


@dataclass(frozen=True)
class Task:
    """One scored comparison: fit on `train` (normal rows), AUROC of `novel` on `test`."""

    protocol: str
    name: str
    train: np.ndarray
    test: np.ndarray
    novel: np.ndarray  # (n_test,) bool
    image_shape: tuple[int, ...] | None

    @property
    def images(self) -> bool:
        return self.image_shape is not None


@dataclass(frozen=True)
class AutoencoderSettings:
    """The autoencoder fitted per task: for images the `novelty` recipe's hyper-parameters
    (`AutoencoderEmbedder` names) with `image_epochs` in place of its own, and `code_size` and
    the density term's `layer` unless None (then the protocol's, `IMAGE_PROTOCOLS`); for tables
    `table_autoencoder` of the table's width, `table_epochs` long."""

    image_epochs: int
    table_epochs: int
    code_size: int | None = None
    seeds: int = 1
    density: bool = True
    neighbours: int = 5
    layer: str | None = None


def load_rows(
    name: str, path: Path | None = None, label_column: str | None = None, columns=None
) -> Rows:
    """Every row of data set `name` (a `training.data.DATASETS` key) with its labels."""
    table = TableOptions(
        columns=None if columns is None else tuple(columns), label_column=label_column
    )
    loaded = DATASETS[name](path, image_size=None, channels=None, table=table)
    parts = [loaded.pool] + ([loaded.official_test] if loaded.official_test is not None else [])
    x = np.concatenate([np.asarray(p.x, dtype=np.float32) for p in parts])
    if any(p.y is None for p in parts):
        raise BenchError(f"{name}: the rows have no labels; give --label-column")
    y = np.concatenate([np.asarray(p.y) for p in parts]).astype(np.int64)
    image_shape = tuple(loaded.pool.x.shape[1:]) if loaded.feature_names is None else None
    classes = [str(c) for c in loaded.origin.get("classes", range(int(y.max()) + 1))]
    return Rows(x.reshape(len(x), -1), y, image_shape, classes)


def split(rows: Rows, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the seeded, stratified 70 / 30 split."""
    index = np.arange(len(rows.y))
    train, test = train_test_split(
        index, train_size=TRAIN_FRACTION, random_state=seed, stratify=rows.y
    )
    return np.sort(train), np.sort(test)


def normal_classes(rows: Rows, names: list[str]) -> list[int]:
    """Label indices of the classes named normal (by name or index); a clear error otherwise."""
    if not names:
        raise BenchError("normal: name the normal classes (--normal a,b)")
    found = []
    for name in names:
        if name in rows.classes:
            found.append(rows.classes.index(name))
        elif name.isdigit() and int(name) < len(rows.classes) and int(name) in set(rows.y):
            found.append(int(name))
        else:
            raise BenchError(
                f"normal: class {name!r} is not in the data; its classes are "
                f"{', '.join(rows.classes)}"
            )
    if set(found) >= set(np.unique(rows.y).tolist()):
        raise BenchError("normal: every class is normal; leave at least one class novel")
    return found


def make_task(protocol: str, name: str, rows: Rows, normal: list[int], seed: int) -> Task:
    train, test = split(rows, seed)
    is_normal = np.isin(rows.y, normal)
    return Task(
        protocol,
        name,
        rows.x[train[is_normal[train]]],
        rows.x[test],
        ~is_normal[test],
        rows.image_shape,
    )


def tasks(args: argparse.Namespace) -> list[Task]:
    """The tasks of the protocols asked for."""
    out: list[Task] = []
    for protocol in args.protocol:
        if protocol == "mnist":
            path = args.mnist_path or default_mnist_dir()
            rows = load_rows("mnist-idx", Path(path))
            for digit in args.digits:
                out.append(make_task("mnist", f"digit {digit}", rows, [digit], args.seed))
        elif protocol == "optdigits":
            rows = load_rows("digits")  # (1, 8, 8) images
            out.append(make_task("optdigits", "0 novel", rows, list(range(1, 10)), args.seed))
        elif protocol == "wbc":
            rows = load_rows("breast-cancer")  # target 1 = benign
            out.append(make_task("wbc", "malignant novel", rows, [1], args.seed))
        elif protocol == "wine":
            out.append(make_task("wine", "class 2 novel", load_rows("wine"), [0, 1], args.seed))
        else:  # table
            if args.data_path is None:
                raise BenchError("table: give --data-path (csv, parquet or npz)")
            kind = {".csv": "csv", ".parquet": "parquet", ".npz": "npz"}.get(args.data_path.suffix)
            if kind is None:
                raise BenchError(
                    f"data-path: expected a .csv, .parquet or .npz file; got {args.data_path}"
                )
            rows = load_rows(kind, args.data_path, args.label_column)
            normal = normal_classes(rows, args.normal)
            name = "normal " + ",".join(args.normal)
            out.append(make_task("table", name, rows, normal, args.seed))
    return out


def standardised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def baseline_scores(method: str, train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    """Novelty scores of `test` (higher: more unusual) from a detector fitted on `train`."""
    if method == "pca":
        pca = PCA(n_components=0.9, svd_solver="full", random_state=seed).fit(train)
        return np.square(test - pca.inverse_transform(pca.transform(test))).sum(1)
    if method == "iforest":
        return -IsolationForest(n_estimators=200, random_state=seed).fit(train).score_samples(test)
    if method == "ocsvm":
        return -OneClassSVM(gamma="scale", nu=0.1).fit(train).score_samples(test)
    if method == "lof":
        k = min(20, len(train) - 1)
        return -LocalOutlierFactor(n_neighbors=k, novelty=True).fit(train).score_samples(test)
    if method == "knn":
        k = min(5, len(train))
        return NearestNeighbors(n_neighbors=k).fit(train).kneighbors(test)[0].mean(1)
    raise ValueError(method)


def autoencoder_scores(
    task: Task, settings: AutoencoderSettings, seed: int
) -> dict[str, np.ndarray]:
    """The served score and its parts, averaged over `settings.seeds` models."""
    parts: dict[str, list[np.ndarray]] = {
        "autoencoder": [],
        "ae-recon": [],
        "ae-unsmoothed": [],
        "ae-bce": [],
    }
    for offset in range(settings.seeds):
        layer = "code"
        if task.images:
            code_size, protocol_layer = IMAGE_PROTOCOLS[task.protocol]
            layer = settings.layer or protocol_layer
            recipe = {**IMAGE_RECIPE, "hidden_sizes": tuple(IMAGE_RECIPE["hidden_sizes"])}
            recipe.update(epochs=settings.image_epochs, code_size=settings.code_size or code_size)
            embedder = AutoencoderEmbedder(
                **recipe, image_shape=task.image_shape, seed=seed + offset
            )
        else:
            embedder = AutoencoderEmbedder(
                **table_autoencoder(task.train.shape[1], settings.table_epochs),
                seed=seed + offset,
            )
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's epoch lines
            embedder.fit(task.train)
        model = embedder.model_
        train = torch.from_numpy(embedder._features(task.train))
        test = torch.from_numpy(embedder._features(task.test))
        score = NoveltyScore.fit(
            model, train, ScoreSettings(settings.density, settings.neighbours, layer=layer), seed
        )
        recon = NoveltyScore.fit(model, train, ScoreSettings(density=False))
        unsmoothed = NoveltyScore.fit(model, train, ScoreSettings(density=False, smooth=False))
        with torch.no_grad():
            parts["autoencoder"].append(score(test)[1].numpy())
            parts["ae-recon"].append(recon(test)[1].numpy())
            parts["ae-unsmoothed"].append(unsmoothed(test)[1].numpy())
            logits = model(test).flatten(1)
            parts["ae-bce"].append(
                reconstruction_error(logits, test, model.config.resolved_loss).numpy()
            )
    out = {name: np.mean(values, axis=0) for name, values in parts.items()}
    if not task.images:  # no smoothing, and the cross-entropy is the squared error
        del out["ae-unsmoothed"], out["ae-bce"]
    return out


def run_task(task: Task, settings: AutoencoderSettings, seed: int) -> dict[str, float]:
    auroc: dict[str, float] = {}
    started = time.perf_counter()
    for name, scores in autoencoder_scores(task, settings, seed).items():
        auroc[name] = float(roc_auc_score(task.novel, scores))
    train, test = (task.train, task.test) if task.images else standardised(task.train, task.test)
    for method in BASELINES:
        auroc[method] = float(roc_auc_score(task.novel, baseline_scores(method, train, test, seed)))
    auroc["seconds"] = time.perf_counter() - started
    return auroc


def summarise(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per protocol: each method's AUROC (the mean over tasks for mnist)."""
    summary: dict[str, dict[str, float]] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in results):
        rows = [r["auroc"] for r in results if r["protocol"] == protocol]
        methods = [m for m in rows[0] if m != "seconds"]
        summary[protocol] = {m: float(np.mean([r[m] for r in rows])) for m in methods}
    return summary


def markdown(results: list[dict], summary: dict, header: str) -> str:
    methods = [m for m in next(iter(summary.values()))]
    lines = [header, "", "| protocol | " + " | ".join(methods) + " |"]
    lines.append("| --- |" + " ---: |" * len(methods))

    def row(label: str, values: dict[str, float]) -> str:
        best = max(values[m] for m in methods if m in values)
        cells = [
            (f"**{values[m]:.3f}**" if values[m] == best else f"{values[m]:.3f}")
            if m in values
            else ""
            for m in methods
        ]
        return f"| {label} | " + " | ".join(cells) + " |"

    for protocol, values in summary.items():
        tasks_ = [r for r in results if r["protocol"] == protocol]
        label = f"{protocol} (mean of {len(tasks_)})" if len(tasks_) > 1 else protocol
        lines.append(row(label, values))
    if any(r["protocol"] == "mnist" for r in results) and len(results) > 1:
        lines += ["", "| mnist digit | " + " | ".join(methods) + " |"]
        lines.append("| --- |" + " ---: |" * len(methods))
        for r in results:
            if r["protocol"] == "mnist":
                lines.append(row(r["task"], r["auroc"]))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits 2 and 8, 20 epochs (smoke)")
    parser.add_argument(
        "--protocol",
        nargs="+",
        default=None,
        choices=[*PROTOCOLS, "table"],
        help=f"protocols to run (default: {' '.join(PROTOCOLS)}, or table with --data-path)",
    )
    parser.add_argument("--digits", type=int, nargs="+", default=None, help="mnist digits")
    parser.add_argument("--mnist-path", type=Path, default=None, help="MNIST IDX folder")
    parser.add_argument("--data-path", type=Path, default=None, help="csv / parquet / npz")
    parser.add_argument("--label-column", default=None, help="the table's class column")
    parser.add_argument(
        "--normal",
        type=lambda s: [c for c in s.split(",") if c],
        default=[],
        help="normal classes, comma-separated names or indices",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"image autoencoder epochs (default: the novelty recipe's {IMAGE_RECIPE['epochs']})",
    )
    parser.add_argument("--seeds", type=int, default=1, help="autoencoders averaged per task")
    parser.add_argument(
        "--code-size", type=int, default=None, help="image code size (default: the protocol's)"
    )
    parser.add_argument(
        "--no-density", action="store_true", help="served score without the code density term"
    )
    parser.add_argument(
        "--neighbours",
        type=int,
        default=5,
        help="neighbours of the density term's local outlier factor (images)",
    )
    parser.add_argument(
        "--score-layer",
        choices=list(DENSITY_LAYERS),
        default=None,
        help="the density term's layer for images (default: the protocol's)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"folder ({RESULTS})")
    args = parser.parse_args(argv)
    if args.protocol is None:
        args.protocol = ["table"] if args.data_path is not None else list(PROTOCOLS)
    if args.digits is None:
        args.digits = [2, 8] if args.quick else list(range(10))  # quick: two hard digits
    if args.epochs is None:
        args.epochs = 20 if args.quick else IMAGE_RECIPE["epochs"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = AutoencoderSettings(
        image_epochs=args.epochs,
        table_epochs=20 if args.quick else TABLE_EPOCHS,
        code_size=args.code_size,
        seeds=args.seeds,
        density=not args.no_density,
        neighbours=args.neighbours,
        layer=args.score_layer,
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        work = tasks(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for task in work:
        auroc = run_task(task, settings, args.seed)
        results.append({"protocol": task.protocol, "task": task.name, "auroc": auroc})
        shown = ", ".join(f"{m} {v:.3f}" for m, v in auroc.items() if m != "seconds")
        print(f"{task.protocol} {task.name}: {shown} ({auroc['seconds']:.1f} s)", flush=True)
    summary = summarise(results)
    seconds = time.perf_counter() - started
    load = {"start": load_before, "end": os.getloadavg()[0]}
    command = "python bench/novelty.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"AUROC of novel rows (`{command.strip()}`; {seconds:.0f} s, "
        f"load average {load['start']:.1f} at start, {load['end']:.1f} at end)"
    )
    table = markdown(results, summary, header)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "novelty-quick" if args.quick else "novelty"
    (args.output / f"{stem}.md").write_text(table)
    record = {
        "command": command.strip(),
        "settings": settings.__dict__,
        "seed": args.seed,
        "seconds": seconds,
        "load_average": load,
        "summary": summary,
        "tasks": results,
    }
    (args.output / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
