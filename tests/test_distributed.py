"""Training on several processes: `torchrun` with 2 CPU processes (gloo) against one process.

With the same global batch, DistributedDataParallel over a DistributedSampler must follow the
one-process run step for step: the losses after the same steps agree to 1e-4 (only the order
of floating-point sums differs). Only rank 0 writes; a run stopped after some epochs and
resumed under torchrun ends where the uninterrupted one does; a checkpoint written by 2
processes refuses a resume by another number. Also: the device choice rule and mixed precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from aet.cli import main
from aet.config import ConfigError
from aet.training.distributed import ProcessGroup, check_precision, resolve_device

# digits limited to 205 rows: 128 training rows, two global batches of 64 per epoch
PRETRAIN = [
    "pretrain",
    "--dataset",
    "digits",
    "--limit",
    "205",
    "--architecture",
    "mlp",
    "--hidden-sizes",
    "32",
    "--code-size",
    "4",
    "--noise",
    "none",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--no-probes",
    "--device",
    "cpu",
    "--no-progress",
]


def torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m aet.training ...` (torch.distributed.run is torchrun)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "aet.training", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tmp_path, capsys):
    two = torchrun([*PRETRAIN, "--runs-dir", str(tmp_path), "--name", "two"], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("pretraining mlp on digits") == 1  # rank 0 alone reports
    assert "(2 process(es), fp32)" in two.stdout
    assert main([*PRETRAIN, "--runs-dir", str(tmp_path), "--name", "one"]) == 0

    one_history = json.loads((tmp_path / "one" / "metrics.json").read_text())["stages"]["train"]
    two_history = json.loads((tmp_path / "two" / "metrics.json").read_text())["stages"]["train"]
    for key in ("train_loss", "val_loss"):
        assert len(two_history[key]) == 3
        assert two_history[key] == pytest.approx(one_history[key], rel=1e-4)
    assert one_history["train_loss"][0] != pytest.approx(one_history["train_loss"][-1], rel=1e-3)

    # The same run in two slices under torchrun: stopped after 2 epochs, then resumed.
    sliced = [*PRETRAIN, "--runs-dir", str(tmp_path), "--name", "sliced"]
    first = torchrun([*sliced, "--stop-after-epochs", "2"], nproc=2)
    assert first.returncode == 1, first.stdout + first.stderr  # torchrun's code for "failed"
    assert "exitcode  : 75" in first.stderr  # rank 0's: stopped, to be resumed
    assert "stopped after this run's stop_after_epochs" in first.stdout
    assert not (tmp_path / "sliced" / "metrics.json").exists()
    second = torchrun([*sliced, "--resume"], nproc=2)
    assert second.returncode == 0, second.stdout + second.stderr
    sliced_history = json.loads((tmp_path / "sliced" / "metrics.json").read_text())
    for key in ("train_loss", "val_loss"):
        assert sliced_history["stages"]["train"][key] == pytest.approx(two_history[key], rel=1e-6)

    capsys.readouterr()
    resumed = main([*PRETRAIN, "--runs-dir", str(tmp_path), "--name", "two", "--resume"])
    assert resumed == 2
    assert "written by 2 process(es); resume with the same number" in capsys.readouterr().err


def test_a_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = ProcessGroup.from_environment("cpu")
    assert (group.rank, group.world_size, group.is_main, group.distributed) == (0, 1, True, False)
    assert group.mean(torch.tensor(3.0)).item() == 3.0
    assert group.gather("state") == ["state"]


def test_device_choice_follows_the_usable_rule():
    assert resolve_device("cpu", usable=True) == torch.device("cpu")
    assert resolve_device("auto", usable=False) == torch.device("cpu")
    assert resolve_device("auto", local_rank=1, usable=True) == torch.device("cuda", 1)
    assert resolve_device("cuda", usable=True) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="device: expected a usable CUDA GPU for 'cuda'"):
        resolve_device("cuda", usable=False)
    with pytest.raises(ConfigError, match="device: expected one of auto, cpu, cuda; got 'tpu'"):
        resolve_device("tpu")


def test_precision_choices():
    assert check_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert check_precision("fp16", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(ConfigError, match="precision: fp16 needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision: expected one of fp32, bf16, fp16"):
        check_precision("fp64", torch.device("cpu"))
