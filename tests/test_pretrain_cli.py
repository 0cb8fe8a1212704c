"""`aet pretrain` end to end: the run folder, config errors before training, Ctrl-C and --resume."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from aet.cli import main
from aet.training.checkpoint import load_checkpoint

torch.set_num_threads(1)

SMALL_RUN = [
    "--architecture",
    "mlp",
    "--hidden-sizes",
    "32",
    "--code-size",
    "4",
    "--noise",
    "masking",
    "--noise-level",
    "0.2",
    "--no-progress",
]


# `aet pretrain` that, after its first epoch, says so and waits for a line on stdin: the test
# sends SIGINT while training is parked there, so the signal always lands mid-run.
PAUSE_AFTER_FIRST_EPOCH = """
import sys
from aet.cli import main
from aet.training.train import Trainer

end_epoch = Trainer._end_epoch

def end_epoch_then_wait(self, *args):
    end_epoch(self, *args)
    if self.position.epoch == 1:
        print("paused after epoch 1", flush=True)
        sys.stdin.readline()

Trainer._end_epoch = end_epoch_then_wait
sys.exit(main(sys.argv[1:]))
"""


def pretrain(*flags, pause_after_first_epoch: bool = False):
    """Start `aet pretrain` in a child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    entry = ["-c", PAUSE_AFTER_FIRST_EPOCH] if pause_after_first_epoch else ["-m", "aet.cli"]
    return subprocess.Popen(
        [sys.executable, *entry, "pretrain", *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_pretrain_one_epoch_writes_the_run_folder(tmp_path):
    child = pretrain(
        "--runs-dir",
        str(tmp_path),
        "--name",
        "smoke",
        "--epochs",
        "1",
        "--layer-epochs",
        "1",
        "--probe-labels",
        "100",
    )
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    run = tmp_path / "smoke"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "checkpoint.pt",
        "config.json",
        "latent_2d.png",
        "loss_curve.png",
        "metrics.json",
        "reconstructions.png",
    ]
    config = json.loads((run / "config.json").read_text())
    assert (config["architecture"], config["code_size"], config["epochs"]) == ("stacked", 8, 1)
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["layer-1", "layer-2", "layer-3", "fine-tune"]
    assert all(len(stage["val_loss"]) == 1 for stage in metrics["stages"].values())
    evaluation = metrics["evaluation"]
    assert evaluation["probe"]["labels"] == [100, 1257]
    assert 0 < evaluation["reconstruction_mse"]["model"] < 0.2
    assert "logistic probe accuracy" in out and "k-NN probe accuracy" in out
    assert load_checkpoint(run / "best.pt").metrics["evaluation"] == evaluation

    # The same run name again without --resume is refused, and the run is left as it was.
    assert main(["pretrain", "--runs-dir", str(tmp_path), "--name", "smoke", "--epochs", "1"]) == 2
    assert json.loads((run / "metrics.json").read_text()) == metrics
    # --resume of a run that does not exist is refused before anything is written.
    assert main(["pretrain", "--runs-dir", str(tmp_path), "--name", "other", "--resume"]) == 2
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--noise", "masking", "--noise-level", "1.0"],
            "masking needs a fraction nu in [0, 1); got 1.0",
        ),
        (["--noise", "salt-and-pepper", "--noise-level", "-0.1"], "got -0.1"),
        (
            ["--noise", "gaussian", "--noise-level", "-0.5"],
            "gaussian needs a finite sigma >= 0; got -0.5",
        ),
        (["--code-size", "64"], "code_size: expected fewer than the 64 inputs"),
        (["--epochs", "0"], "epochs: expected a positive integer; got 0"),
        (["--probe-labels", "0"], "probe_labels: expected positive label counts; got [0]"),
        (
            ["--no-probes", "--probe-labels", "50"],
            "probe_labels: --probe-labels 50 was given with --no-probes",
        ),
    ],
)
def test_invalid_hyper_parameters_are_rejected_before_training(tmp_path, capsys, flags, message):
    assert main(["pretrain", "--runs-dir", str(tmp_path), "--name", "bad", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "toml, message",
    [
        ('architecture = "rbm"', "valid: mlp, linear, stacked, vae, conv"),
        ('noise = "speckle"', "valid corruptions: none, gaussian, masking, salt-and-pepper"),
        ('dataset = "cifar"', "valid data sets: digits, mnist-idx, npz, image-folder"),
        ("hidden_sizes = []", "expected at least one hidden layer size; got an empty list"),
    ],
)
def test_unknown_choices_in_a_config_file_list_the_valid_ones(tmp_path, capsys, toml, message):
    (tmp_path / "run.toml").write_text(toml + "\n")
    assert (
        main(["pretrain", "--runs-dir", str(tmp_path), "--config", str(tmp_path / "run.toml")]) == 2
    )
    assert message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["run.toml"]


def test_ctrl_c_saves_and_exits_130_and_resume_finishes_exactly_like_an_uninterrupted_run(tmp_path):
    flags = [
        "--runs-dir",
        str(tmp_path),
        *SMALL_RUN,
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--patience",
        "4",
        "--no-probes",
    ]
    interrupted = pretrain("--name", "run", *flags, pause_after_first_epoch=True)
    for line in interrupted.stdout:  # parked after epoch 1, its SIGINT handler installed
        if line.startswith("paused after epoch 1"):
            break
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate("go on\n", timeout=300)
    assert interrupted.returncode == 130, err
    assert "continue with --resume" in out
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved.stage == "train" and saved.epoch == 1
    assert not (tmp_path / "run" / "metrics.json").exists()

    # Resume and the uninterrupted reference run in this process (the child covered the CLI).
    assert main(["pretrain", "--name", "run", "--resume", *flags]) == 0
    assert main(["pretrain", "--name", "reference", *flags]) == 0
    want = load_checkpoint(tmp_path / "reference" / "best.pt")
    got = load_checkpoint(tmp_path / "run" / "best.pt")
    assert got.metrics == want.metrics
    assert "probe" not in got.metrics["evaluation"]  # --no-probes: reconstruction alone
    assert got.metrics["evaluation"]["reconstruction_mse"]["model"] > 0
    assert all(torch.equal(got.model_state[k], want.model_state[k]) for k in want.model_state)


def test_recipes_are_shipped_and_flags_override_them(tmp_path):
    from aet.config import config_from_mapping
    from aet.training.pretrain import PretrainConfig, config_of, configure_parser
    from aet.training.recipes import load_recipe, recipe_names

    assert {"digits", "images", "images-small", "novelty"} <= set(recipe_names())
    for name in recipe_names():  # every shipped recipe is a valid configuration
        config_from_mapping(PretrainConfig, load_recipe(name))

    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    digits = config_of(parser.parse_args(["--recipe", "digits"]))
    assert digits.to_dict() == {**PretrainConfig().to_dict(), "recipe": "digits"}  # the defaults
    images = config_of(parser.parse_args(["--recipe", "images"]))
    model, training = images.model, images.training
    assert (images.recipe, model.architecture, model.code_size) == ("images", "conv", 256)
    assert training.augmentation.augment_translate > 0 and training.noise == "masking"
    override = config_of(parser.parse_args(["--recipe", "images", "--code-size", "64"]))
    assert (override.model.code_size, override.model.hidden_sizes) == (64, model.hidden_sizes)
    (tmp_path / "run.toml").write_text('recipe = "images"\nepochs = 3\n')
    from_file = config_of(parser.parse_args(["--config", str(tmp_path / "run.toml")]))
    assert (from_file.recipe, from_file.training.epochs, from_file.model.code_size) == (
        "images",
        3,
        256,
    )


def test_an_unknown_recipe_names_the_shipped_ones(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('recipe = "cifar"\n')
    assert main(["pretrain", "--config", str(tmp_path / "run.toml")]) == 2
    assert (
        "recipe: unknown recipe 'cifar'; valid recipes: digits, images" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "x, message",
    [
        (np.eye(16, dtype=np.uint8)[:12].reshape(12, 4, 4), r"every value in \{0, 1\}.*x \* 255"),
        (np.full((12, 4, 4), 7, np.int16), "dtype int16; expected uint8"),
    ],
)
def test_npz_of_binary_bytes_or_other_integers_exits_2_and_writes_nothing(
    tmp_path, capsys, x, message
):
    np.savez(tmp_path / "data.npz", x=x)
    argv = ["pretrain", "--dataset", "npz", "--data-path", str(tmp_path / "data.npz")]
    status = main([*argv, "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"])
    assert status == 2 and not (tmp_path / "runs").exists()
    assert re.search(message, capsys.readouterr().err)
