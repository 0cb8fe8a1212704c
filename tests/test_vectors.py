"""Vector data: tables of numeric features (csv, parquet, 2-D npz, wine, breast-cancer), the
Gaussian model on standardised features, and vector graphs that standardise inside."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pyarrow as pa
import pyarrow.parquet
import pytest
import torch
from sklearn.datasets import load_wine

from aet.cli import main
from aet.clients.embeddings import read_embeddings
from aet.config import ConfigError, config_from_mapping
from aet.proto import embedding_pb2 as pb
from aet.proto.codec import decode_tensor, encode_tensor
from aet.repository import read_model_card
from aet.server.validation import FLOAT32, RequestSpec
from aet.training.checkpoint import load_checkpoint
from aet.training.data import DataError, load_dataset
from aet.training.dataspec import DataSpec
from aet.training.evaluate import encode_array
from aet.training.pretrain import PretrainConfig
from aet.training.probes import logistic_probe


def wine_table() -> tuple[np.ndarray, np.ndarray, list[str]]:
    bunch = load_wine()
    return bunch.data.astype(np.float32), bunch.target, list(bunch.feature_names)


def write_csv(path: Path, columns: dict[str, list]) -> Path:
    names = list(columns)
    lines = [",".join(names)]
    lines += [",".join(str(v) for v in row) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def wine_files(tmp_path) -> dict[str, Path]:
    """The wine table as csv (text labels), parquet (integer labels) and npz (x, y)."""
    x, y, names = wine_table()
    classes = np.array(["barolo", "grignolino", "barbera"])  # sorted: barbera, barolo, grign.
    columns = {name: x[:, j].tolist() for j, name in enumerate(names)}
    write_csv(tmp_path / "wine.csv", {**columns, "cultivar": classes[y].tolist()})
    table = pa.table({**{n: x[:, j] for j, n in enumerate(names)}, "cultivar": y})
    pyarrow.parquet.write_table(table, tmp_path / "wine.parquet")
    np.savez(tmp_path / "wine.npz", x=x, y=y)
    return {kind: tmp_path / f"wine.{kind}" for kind in ("csv", "parquet", "npz")}


def test_csv_parquet_npz_and_bundled_wine_give_the_same_standardised_split(wine_files):
    x, y, names = wine_table()
    bundled = load_dataset("wine")
    parquet = load_dataset("parquet", wine_files["parquet"], label_column="cultivar")
    npz = load_dataset("npz", wine_files["npz"])
    csv = load_dataset("csv", wine_files["csv"], label_column="cultivar")
    assert bundled.image_shape == (13,) and bundled.is_vectors and bundled.num_classes == 3
    assert bundled.feature_names == tuple(names) == parquet.feature_names == csv.feature_names
    assert npz.feature_names == tuple(f"x{j}" for j in range(13))
    assert csv.source["classes"] == ["barbera", "barolo", "grignolino"]
    # Text labels are numbered differently, so the stratified cut of the csv differs; the other
    # sources hold the same numbers and labels and give the very same split.
    for other in (parquet, npz):
        for part in ("train", "val", "test"):
            np.testing.assert_allclose(
                getattr(other, part).x,
                getattr(bundled, part).x,
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{other.name} {part}",
            )
    np.testing.assert_array_equal(npz.test.y, parquet.test.y)
    np.testing.assert_array_equal(bundled.test.y, parquet.test.y)
    csv_rows = np.concatenate([csv.raw(csv.fit.x), csv.raw(csv.test.x)])
    np.testing.assert_allclose(np.sort(csv_rows, axis=0), np.sort(x, axis=0), rtol=1e-5)
    # Standardised with the training split's statistics only, and back to raw units exactly.
    assert np.abs(bundled.train.x.mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(bundled.train.x.std(axis=0), 1.0, rtol=1e-4)
    assert np.abs(bundled.test.x.mean(axis=0)).max() > 1e-3
    raw_test = bundled.raw(bundled.test.x)
    assert {tuple(r) for r in np.round(raw_test, 3)} <= {tuple(r) for r in np.round(x, 3)}
    # csv labels are class names numbered in sorted order: barolo (0 in sklearn) becomes 1.
    relabelled = np.array([1, 2, 0])[y]
    for row, label in zip(csv.raw(csv.test.x), csv.test.y, strict=True):
        assert relabelled[np.abs(x - row).max(axis=1).argmin()] == label


def test_columns_choose_features_in_order(wine_files):
    data = load_dataset(
        "csv", wine_files["csv"], columns=["proline", "alcohol"], label_column="cultivar"
    )
    assert data.feature_names == ("proline", "alcohol") and data.image_shape == (2,)
    unlabelled = load_dataset("npz", wine_files["npz"], columns=["x2", "x0"])
    assert unlabelled.image_shape == (2,) and unlabelled.num_classes == 3  # npz keeps its y


@pytest.mark.parametrize(
    "columns, options, message",
    [
        (
            {"a": [1, 2, "x", "y"], "b": [1, 2, 3, 4]},
            {},
            r"non-numeric feature column\(s\): column 'a': 2 of 4 values are not numbers "
            r"\(first: 'x'\); choose numeric columns with --columns",
        ),
        (
            {"a": [1, "", "nan", 4], "b": [1, "inf", 3, "-inf"], "c": [1, 2, 3, 4]},
            {},
            r"column 'a': 2 missing \(null or NaN\) and 0 infinite value\(s\); column 'b': 0 "
            r"missing \(null or NaN\) and 2 infinite value\(s\); fix the data or pass "
            r"--drop-missing",
        ),
        (
            {"a": [1, 2, 3, 4], "label": ["u", "", "v", "u"]},
            {"label_column": "label"},
            r"label column 'label': 1 missing value\(s\)",
        ),
        ({"a": [1, 2]}, {"label_column": "kind"}, r"label column 'kind' not found; columns: a"),
        ({"a": [1, 2]}, {"columns": ["a", "b", "c"]}, r"column\(s\) 'b', 'c' not found"),
        ({"a": [1, 2], "b": [True, False]}, {}, r"column 'b': type bool, not numbers"),
    ],
)
def test_table_faults_name_the_column_and_the_count(tmp_path, columns, options, message):
    path = tmp_path / "bad.csv"
    write_csv(path, columns)
    with pytest.raises(DataError, match=message) as error:
        load_dataset("csv", path, **options)
    assert str(error.value).startswith(f"{path}: ")


def test_drop_missing_drops_those_rows_and_records_how_many(tmp_path):
    path = write_csv(
        tmp_path / "gaps.csv",
        {
            "a": [1, "", 3, 4, 5, 6, 7, 8, 9, 10],
            "b": [1, 2, "inf", 4, 5, 6, 7, 8, 9, 10],
            "label": ["u", "v", "u", "", "v", "u", "v", "u", "v", "u"],
        },
    )
    data = load_dataset("csv", path, label_column="label", drop_missing=True, val_fraction=0)
    assert data.source["dropped_rows"] == 3 and len(data.fit) + len(data.test) == 7
    raw = np.concatenate([data.raw(data.fit.x), data.raw(data.test.x)])
    assert sorted(raw[:, 0].round().astype(int).tolist()) == [1, 5, 6, 7, 8, 9, 10]


def test_every_row_missing_or_no_rows_is_an_error(tmp_path):
    with pytest.raises(DataError, match="every one of 2 rows has a missing or infinite value"):
        path = write_csv(tmp_path / "a.csv", {"a": ["", 2], "b": [1, "inf"]})
        load_dataset("csv", path, drop_missing=True)
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_dataset("csv", tmp_path / "empty.csv")
    with pytest.raises(DataError, match="no such file"):
        load_dataset("parquet", tmp_path / "absent.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset("parquet", tmp_path / "text.parquet")


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("digits", {"columns": ["a"]}, "columns: digits images are not a table of features"),
        ("digits", {"drop_missing": True}, "drop_missing: digits images are not a table"),
        ("wine", {"label_column": "y"}, "label_column: the wine data set comes with its labels"),
        ("wine", {"image_size": 8}, "image_size / channels: wine holds vectors, not images"),
        ("wine", {"columns": ["alcohol", "alcohol_typo"]}, r"'alcohol_typo' not found"),
    ],
)
def test_options_that_do_not_fit_the_data_set_are_refused(name, arguments, message):
    with pytest.raises((ConfigError, DataError), match=message):
        load_dataset(name, **arguments)


def test_npz_table_takes_its_labels_from_y_only(wine_files):
    with pytest.raises(ConfigError, match="label_column: an npz archive keeps its labels in"):
        load_dataset("npz", wine_files["npz"], label_column="y")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"architecture": "conv", "hidden_sizes": [4]}, "architecture: conv needs images"),
        ({"loss": "bce"}, "loss: bce .* needs data in \\[0, 1\\]; vectors are standardised"),
    ],
)
def test_conv_and_bce_refuse_vectors_clearly(fields, message):
    config = config_from_mapping(PretrainConfig, {"dataset": "wine", **fields})
    config.model.for_data(standardized=False)  # both are valid for images
    with pytest.raises(ConfigError, match=message):
        config.model.for_data(standardized=True)


def test_vectors_default_to_the_gaussian_model_and_refuse_salt_and_pepper():
    config = PretrainConfig(data=DataSpec("wine"))
    assert config.model.for_data(standardized=True).loss == "mse"
    assert config.model.for_data(standardized=False).loss == "bce"
    with pytest.raises(ConfigError, match="noise: salt-and-pepper .* use gaussian or masking"):
        config_from_mapping(
            PretrainConfig, {"dataset": "wine", "noise": "salt-and-pepper"}
        ).load_dataset()


def test_pretrain_and_export_a_csv_table_through_the_cli(
    wine_files, tmp_path, start_server, embedding_stub
):
    """`aet pretrain --dataset csv --loss gaussian` then `aet export`: the graph takes raw
    features, standardises inside, and its score is the squared error of the decoder's mean
    weighed by each feature's residual spread plus the code's Mahalanobis distance from the
    training codes (the variance layer trains the model and stays out of the graph)."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    arguments = ["--dataset", "csv", "--data-path", str(wine_files["csv"])]
    arguments += ["--label-column", "cultivar", "--columns", *wine_table()[2][:6]]
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        status = main(
            ["pretrain", *arguments, "--runs-dir", str(tmp_path / "runs"), "--name", "table"]
            + ["--architecture", "mlp", "--hidden-sizes", "8", "--code-size", "3"]
            + ["--activation", "elu", "--loss", "gaussian"]
            + ["--epochs", "3", "--no-progress", "--no-probes"]
        )
        assert status == 0
        status = main(
            ["export", "--run", str(tmp_path / "runs" / "table")]
            + ["--repository", str(tmp_path / "exported")]
        )
    assert status == 0
    run_dir, version = tmp_path / "runs" / "table", tmp_path / "exported" / "table" / "1"
    assert not (run_dir / "reconstructions.png").exists() and (run_dir / "latent_2d.png").exists()
    card = read_model_card(version / "model.json")
    assert (card.input.name, card.input.shape, card.input.value_range) == ("features", (6,), None)
    assert card.input.feature_names == tuple(wine_table()[2][:6])
    assert card.hyperparameters["loss"] == "gaussian" and card.standardizer["shape"] == [6]
    assert card.preprocessing[0].startswith("standardize: (features - mean) / std")
    assert card.score.measure.startswith(
        "mean squared error per feature in standardised units, each feature's divided by its "
        "residual standard deviation on the training rows"
    )
    assert "squared Mahalanobis distance of the code" in card.score.measure
    assert json.loads((version / "model.json").read_text())["input"]["value_range"] is None
    assert RequestSpec.from_card(card, 10).accepted_dtypes == (FLOAT32,)

    data = load_dataset(
        "csv", wine_files["csv"], label_column="cultivar", columns=wine_table()[2][:6]
    )
    autoencoder = load_checkpoint(run_dir / "best.pt").build_model()
    assert autoencoder.log_variance is not None  # it trained the model; the graph is the mean
    session = onnxruntime.InferenceSession(
        str(version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    raw = data.raw(data.test.x)  # what a user sends: features in their own units
    embedding, score = session.run(None, {"features": raw})
    with torch.no_grad():
        standardised = torch.from_numpy(data.test.x)
        expected = autoencoder.encode(standardised).numpy()
        residual = (standardised - autoencoder(standardised)).double().numpy()
        train = torch.from_numpy(data.train.x)
        train_residual = (train - autoencoder(train)).double().numpy()
        train_codes = autoencoder.encode(train).double().numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-4)
    # the score by hand: the squared error with each feature's divided by its residual spread
    # on the training rows, plus the code's squared Mahalanobis distance from the training
    # codes, each standardised on the training rows
    spread = train_residual.std(0, ddof=1)
    inverse = np.linalg.inv(np.cov(train_codes.T))

    def mahalanobis(codes: np.ndarray) -> np.ndarray:
        centred = codes - train_codes.mean(0)
        return np.einsum("ij,jk,ik->i", centred, inverse, centred)

    squared = np.square(residual / spread).mean(1)
    train_squared = np.square(train_residual / spread).mean(1)
    density, own = mahalanobis(expected.astype(np.float64)), mahalanobis(train_codes)
    by_hand = (squared - train_squared.mean()) / train_squared.std(ddof=1) + (
        density - own.mean()
    ) / own.std(ddof=1)
    np.testing.assert_allclose(score, by_hand, rtol=1e-3, atol=1e-3)

    # The server takes (N, D) float32 rows in their own units (no uint8: no value range).
    stub = embedding_stub(start_server(tmp_path / "exported"))
    request = pb.EmbedRequest(
        model="table",
        inputs=encode_tensor(raw),
        options=pb.EmbedOptions(reconstruction_error=True),
    )
    answer = stub.Embed(request, timeout=30)
    np.testing.assert_allclose(decode_tensor(answer.embeddings, "e"), embedding, atol=1e-6)
    np.testing.assert_allclose(decode_tensor(answer.reconstruction_error, "s"), score, rtol=1e-6)
    request.inputs.CopyFrom(encode_tensor(np.zeros((2, 6), np.uint8)))
    with pytest.raises(grpc.RpcError) as error:
        stub.Embed(request, timeout=30)
    assert "inputs.dtype: expected float32, got uint8" in error.value.details()

    # `aet embed` reads the same table and sends raw features; the graph standardises them.
    output = tmp_path / "codes.parquet"
    with quiet:
        status = main(
            ["embed", "--local", str(version), "--dataset", "csv"]
            + ["--data-path", str(wine_files["csv"])]
            + ["--label-column", "cultivar", "--columns", *wine_table()[2][:6]]
            + ["--score", "--no-progress", "--output", str(output)]
        )
    assert status == 0
    table = read_embeddings(output)
    test_rows = table.split == "test"
    np.testing.assert_allclose(table.embeddings[test_rows], embedding, atol=1e-5)
    np.testing.assert_allclose(table.scores[test_rows], score, rtol=1e-5, atol=1e-5)  # z units
    np.testing.assert_array_equal(table.labels[test_rows], data.test.y)

    # `aet probe --model` reloads the table with the columns and labels model.json records.
    with quiet:
        status = main(
            ["probe", "--model", str(version), "--label-counts", "30", "--steps", "20"]
            + ["--output", str(tmp_path / "probe")]
        )
    assert status == 0
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert (results["dataset"], results["model"]["input_shape"]) == ("csv", [6])
    assert results["label_counts"] == [30, len(data.fit)] and results["split_warning"] is None
    assert len(results["accuracy"]["embedding"]["logreg"]) == 2


@pytest.mark.parametrize("name", ["wine", "breast-cancer"])
def test_codes_probe_within_three_points_of_standardised_raw_features(name):
    """Real data: a logistic probe on 8-d codes of an MLP autoencoder (Gaussian model) is
    within 0.03 of one on the standardised raw features, with all training labels."""
    config = config_from_mapping(
        PretrainConfig,
        dict(
            dataset=name,
            architecture="mlp",
            hidden_sizes=[32],
            code_size=8,
            epochs=60,
            patience=60,
            progress=False,
        ),
    )
    data = config.load_dataset()
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stderr(io.StringIO()):
        trainer = config.trainer(data, Path(run_dir))
        trainer.fit()
    model = trainer.model
    fit, test = data.fit, data.test
    # The fair probe: C and standardisation chosen by CV on the training rows, for both sides.
    codes = logistic_probe(
        encode_array(model, fit.x), fit.y, encode_array(model, test.x), test.y
    ).accuracy
    raw = logistic_probe(fit.x, fit.y, test.x, test.y).accuracy
    assert codes >= raw - 0.03, (codes, raw)
