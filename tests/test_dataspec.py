"""One `DataSpec`: the same data flags in every command, recorded in model.json and read back."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aet.cli import main
from aet.config import add_config_arguments, config_from_args, config_from_mapping
from aet.repository import read_model_card
from aet.training.dataspec import DataSpec, SplitMismatch
from aet.training.pretrain import PretrainConfig


def test_group_fields_are_flags_and_flat_or_nested_toml(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 2\n[data]\ndataset = "wine"\nlimit = 50\n')
    args = parser.parse_args(["--config", str(toml), "--seed", "3", "--image-size", "12"])
    config = config_from_args(PretrainConfig, args)
    assert config.data == DataSpec(
        "wine", seed=3, limit=50, image_size=12, val_fraction=0.1, drop_missing=False
    )
    assert config.training.epochs == 2 and config.seed == 3 == config.training.seed
    # config.json and checkpoints keep flat field names, and read back
    flat = config.to_dict()
    assert flat["dataset"] == "wine" and flat["limit"] == 50 and "data" not in flat
    assert config_from_mapping(PretrainConfig, flat) == config


def test_record_reads_back_and_official_test_means_none():
    spec = DataSpec("csv", Path("t.csv"), columns=["a"], label_column="y", seed=2, limit=9)
    assert DataSpec.from_record(spec.record()) == spec.with_defaults()
    card = {"name": "mnist-idx", "path": "/m", "seed": 0, "test_fraction": "official"}
    assert DataSpec.from_record(card).test_fraction is None


def test_resolution_fills_from_the_card_and_refuses_a_change(tmp_path):
    card = DataSpec("digits", seed=4, limit=300).with_defaults().record()
    resolved, note = DataSpec(image_size=None).resolve_against(
        card, tmp_path / "model.json", allow_mismatch=False
    )
    assert (resolved.seed, resolved.limit, note) == (4, 300, None)
    with pytest.raises(SplitMismatch, match=r"--limit 5 \(pretraining: 300\)"):
        DataSpec(limit=5).resolve_against(card, tmp_path / "model.json", allow_mismatch=False)
    resolved, note = DataSpec(limit=5).resolve_against(card, tmp_path, allow_mismatch=True)
    assert (
        resolved.limit == 5
        and note == "split differs from pretraining: --limit 5 (pretraining: 300)"
    )


def _image_folder(root: Path) -> Path:
    """Three classes of 20x20 grey images: a bar at a class-specific place, plus noise."""
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(24):
            pixels = rng.integers(0, 60, (20, 20))
            pixels[:, 6 * label : 6 * label + 5] += 180
            Image.fromarray(pixels.astype(np.uint8), "L").save(root / f"class{label}/{index}.png")
    return root


def test_image_folder_encoder_at_image_size_16_is_embedded_probed_and_given_a_head(tmp_path):
    """The image size travels with the data set: pretrain at 16x16, export, then `aet embed
    --local`, `aet probe --model` and `aet head` need no data flags at all."""
    folder = _image_folder(tmp_path / "images")
    quick = ["--architecture", "mlp", "--hidden-sizes", "32", "--code-size", "4"]
    assert (
        main(
            [
                "pretrain",
                "--dataset",
                "image-folder",
                "--data-path",
                str(folder),
                "--image-size",
                "16",
                *quick,
                "--epochs",
                "2",
                "--no-probes",
                "--no-progress",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--name",
                "bars",
            ]
        )
        == 0
    )
    repository = tmp_path / "exported"
    argv = ["export", "--run", str(tmp_path / "runs/bars"), "--repository", str(repository)]
    assert main(argv) == 0
    card = read_model_card(repository / "bars/1/model.json")
    assert card.input.shape == (1, 16, 16) and card.dataset["image_size"] == 16

    output = tmp_path / "bars.npz"
    argv = ["embed", "--local", str(repository / "bars"), "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    with np.load(output) as archive:
        assert archive["embeddings"].shape == (72, 4)

    results = tmp_path / "probe"
    argv = ["probe", "--model", str(repository / "bars"), "--label-counts", "30"]
    assert main([*argv, "--steps", "20", "--output", str(results)]) == 0
    assert (results / "results.json").exists()

    argv = ["head", "--model", str(repository / "bars"), "--name", "bars-head"]
    assert main(argv) == 0
    head = read_model_card(repository / "bars-head/1/model.json")
    assert head.input.shape == (1, 16, 16) and head.classifier is not None
    assert head.classifier.labels == ("class0", "class1", "class2")
