"""Every script in bench/ runs in its `--quick` mode and reports figures that make sense.

Each runs in a child process as a user would start it; the checks are on what it prints or
writes (every scenario present, rates positive, shares in range), never on how fast it was.
Marked `bench` (tens of seconds each): `pytest -m "not bench"` leaves them out.

compare_triton.py measures PyTriton too when `AET_PYTRITON_PYTHON` names the interpreter of a
virtualenv with nvidia-pytriton (see the script's docstring); otherwise our server only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_wine

from aet.devices import nvidia_gpu_present
from aet.training.pretrain import config_of, configure_parser
from aet.training.probes import FeatureSet, probe_features

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPT_TIMEOUT = 600  # seconds; a hung server or client fails the test instead of the suite

pytestmark = pytest.mark.bench


def run_quick(script: str, *args: str, cwd: Path) -> str:
    """Run `bench/<script> --quick ARGS`; its output (stdout and stderr) if it exits 0."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} --quick exited {done.returncode}:\n{output[-4000:]}"
    return output


def test_every_bench_script_has_a_test():
    scripts = {p.relative_to(BENCH).as_posix() for p in BENCH.rglob("*.py")}
    # pytriton_server.py is a child that compare_triton.py starts, not a benchmark.
    tested = {"pretrain.py", "serve.py", "extract.py", "score.py", "gpu.py", "novelty.py"}
    tested |= {"peers/compare_triton.py"}
    assert scripts - {"peers/pytriton_server.py"} == tested


def test_pretrain_quick(tmp_path):
    out = tmp_path / "pretrain.json"
    run_quick("pretrain.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["case"].startswith("digits") and row["threads"] == 1
    assert row["samples_per_s"] > 0 and row["steps_per_epoch"] > 0
    assert row["step_cpu_ms"] > 0 and row["compute_step_cpu_ms"] > 0  # measured apart: no order
    assert 0 <= row["overhead_share"] < 1
    assert len(result["load_average_at_end"]) == 3


def test_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    output = run_quick("serve.py", "--output", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert [e["batch"] for e in result["large_one_client"]] == [64, 256]
    for entry in result["large_one_client"]:
        assert entry["stream_rows_per_s"] > 0 and entry["unary_rows_per_s"] > 0
    tiny = result["tiny_batch_1"]
    assert tiny["p99_ms"] >= tiny["p50_ms"] > 0 and tiny["in_process_p50_ms"] > 0
    assert tiny["server_cpu_us_per_call"] > 0 and tiny["bare_grpcio_cpu_us_per_call"] > 0
    assert set(tiny["breakdown_p50_us"]) == {
        "decode",
        "queue",
        "run",
        "encode",
        "grpc_network_client",
    }
    for name in ("large", "tiny"):
        modes = result["sixteen_one_row_clients"][name]
        for mode in ("batching_on", "batching_off"):
            assert modes[mode]["calls_per_s"] > 0
            assert modes[mode]["p99_ms"] >= modes[mode]["p50_ms"] > 0
    memory = result["memory"]
    assert memory["requests"] > 0 and memory["rss_after_mb"] > 0
    machine = result["machine"]
    assert machine["quick"] and machine["load_average_at_end"] >= 0
    assert "load average" in output


def test_extract_quick(tmp_path, model_repository):
    output = run_quick("extract.py", "--repository", str(model_repository), cwd=tmp_path)
    rates = dict(re.findall(r"^\s*(\w+): start-up .*?([\d,]+) rows/s median", output, re.M))
    assert set(rates) == {"local", "server", "ray"}, output[-4000:]
    assert all(float(rate.replace(",", "")) > 0 for rate in rates.values())
    # The probe table's last column is the accuracy with all labels: far above chance (0.1).
    embedding = re.search(r"^\| embedding \| logistic regression \|.*\| ([\d.]+) \|$", output, re.M)
    assert embedding is not None, output[-4000:]
    assert float(embedding.group(1)) > 0.5
    assert not (tmp_path / "bench").exists()  # --quick writes no results


def test_score_quick(tmp_path):
    out = tmp_path / "score.json"
    output = run_quick("score.py", "--output", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    sides = {"old_embedding", "new_embedding", "new_scored"}
    for name in ("tiny", "large"):
        by_rows = result["in_process_ms"][name]
        assert list(by_rows) == ["1", "64", "256"]
        for ms in by_rows.values():
            assert all(ms[side] > 0 for side in sides)
            assert ms["scored_over_embedding"] > 0 and ms["new_over_old_embedding"] > 0
        served = result["served_p50_ms"][name]
        assert list(served) == ["1", "64"] and all(served["1"][side] > 0 for side in sides)
    assert result["load_average"]["end"] >= 0 and "load average" in output


def test_novelty_quick(tmp_path):
    """Every protocol, every method scored on the same rows; the served score (smoothed
    reconstruction term plus code density) beats PCA's reconstruction error on the quick
    MNIST (digits 2 and 8), optdigits and wbc protocols, and on MNIST the smoothed term beats
    the same term unsmoothed, which beats the mean cross-entropy served first."""
    output = run_quick("novelty.py", "--threads", "1", "--output", str(tmp_path), cwd=tmp_path)
    result = json.loads((tmp_path / "novelty-quick.json").read_text())
    summary = result["summary"]
    assert list(summary) == ["mnist", "optdigits", "wbc", "wine"]
    methods = {"autoencoder", "ae-recon", "pca", "iforest", "ocsvm", "lof", "knn"}
    assert {"ae-unsmoothed", "ae-bce"} <= set(summary["mnist"])
    for values in summary.values():
        assert methods <= set(values) and all(0 <= v <= 1 for v in values.values())
    assert [t["task"] for t in result["tasks"][:2]] == ["digit 2", "digit 8"]
    for protocol in ("mnist", "optdigits", "wbc"):
        assert summary[protocol]["autoencoder"] > summary[protocol]["pca"], protocol
    mnist = summary["mnist"]
    assert mnist["ae-recon"] > mnist["ae-unsmoothed"] > mnist["ae-bce"]
    table = (tmp_path / "novelty-quick.md").read_text()
    assert "| optdigits |" in table and "load average" in output


def load_script(script: str):
    """`bench/<script>` imported as a module, for checks that need no child process."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_novelty_table_without_its_normal_classes_is_a_clear_error(tmp_path, capsys):
    novelty = load_script("novelty.py")
    data = tmp_path / "rows.csv"
    data.write_text("a,b,kind\n" + "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(20)))
    for normal, named in (("z", "'z' is not in the data; its classes are x, y"), ("", "--normal")):
        args = ["--data-path", str(data), "--label-column", "kind", "--normal", normal]
        assert novelty.main([*args, "--output", str(tmp_path)]) == 2
        assert named in capsys.readouterr().err
    assert not list(tmp_path.glob("novelty*.json"))


def run_gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`bash bench/gpu.sh ARGS`, as a user starts it."""
    command = ["bash", str(BENCH / "gpu.sh"), *args]
    environment = os.environ | {"PYTHON": sys.executable}  # the script's default is python3
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT
    )


@pytest.mark.skipif(nvidia_gpu_present(), reason="a GPU is here: the check would really run")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    done = run_gpu_check(str(tmp_path / "results"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1 and "no NVIDIA GPU" in done.stdout and not done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--epochs", "0"], "--epochs"), (["--sections", "serve,gpu"], "--sections")],
)
def test_gpu_check_refuses_bad_arguments_before_any_work(tmp_path, flags, named):
    done = run_gpu_check(str(tmp_path / "results"), *flags, cwd=tmp_path)
    assert done.returncode == 2 and named in done.stderr
    assert not (tmp_path / "results").exists()


def test_gpu_check_quick_on_cpu(tmp_path):
    """Every section on CPU: the same code paths a GPU run takes, with the CPU provider."""
    results = tmp_path / "results"
    done = run_gpu_check(str(results), "--quick", "--device", "cpu", "--skip-probe", cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((results / "gpu.json").read_text())
    assert report["failures"] == [] and report["device"] == "cpu"
    assert "CPUExecutionProvider" in report["env"]["onnxruntime_providers"]
    train = report["train"]
    (run,) = train["runs"]
    assert run["ok"] and run["seconds_per_epoch"] > 0 and "logistic_probe" not in run
    assert train["torchrun"]["ok"] and train["export"]["exit_code"] == 0
    serve = report["serve"]
    assert set(serve["checks"]) == {"digits", "large", "trained"}
    for check in serve["checks"].values():
        assert check["provider"] == "CPUExecutionProvider"
        assert check["max_abs_diff_vs_cpu"] <= 1e-4
    assert len(serve["grid"]) == 2 * 2 * 2  # batch x clients x dynamic batching on / off
    for point in serve["grid"]:
        assert point["rows_per_s"] > 0 and point["p99_ms"] >= point["p50_ms"] > 0
    assert all(p["rows_per_s"] > 0 for p in serve["in_process"])
    (job,) = report["extract"]["jobs"]  # local; Ray is left out of --quick
    assert job["backend"] == "local" and job["rows"] == 1797 and job["rows_per_s"] > 0
    summary = (results / "gpu.md").read_text()
    assert "## Serving" in summary and "## Failures\n\nnone" in summary


def test_gpu_check_reads_the_probe_table_pretrain_writes():
    """The fp32 run's probe figures come from metrics.json as `aet pretrain` writes it (the
    quick run above skips the probe: tuning it takes minutes on CPU)."""
    gpu = load_script("gpu.py")
    rng = np.random.default_rng(0)
    fit_y, test_y = np.arange(60) % 3, np.arange(30) % 3
    features = [
        FeatureSet(name, rng.normal(size=(60, 4)) + fit_y[:, None], rng.normal(size=(30, 4)))
        for name in ("model", "pixels")
    ]
    probe = probe_features(features, fit_y, test_y, [30, 60])
    figures = gpu.logistic_probe_figures({"probe": probe})
    assert figures["probe_labels"] == [30, 60]
    assert figures["logistic_probe"] == probe["accuracy"]["model"]["logreg"]
    assert figures["pixels_probe"] == probe["accuracy"]["pixels"]["logreg"]


def _perf_analyzer_installed() -> bool:
    try:
        metadata.distribution("tritonclient")
        metadata.distribution("nvidia-cuda-runtime-cu12")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _perf_analyzer_installed(), reason="perf_analyzer not installed (make install brings it)"
)
def test_compare_triton_quick(tmp_path):
    out = tmp_path / "peers.json"
    pytriton = os.environ.get("AET_PYTRITON_PYTHON")
    args = ["--output", str(out)] + (["--pytriton-python", pytriton] if pytriton else [])
    output = run_quick("peers/compare_triton.py", *args, cwd=ROOT)
    result = json.loads(out.read_text())
    measured = {(m["server"], m["batch_size"], m["concurrency"]) for m in result["measurements"]}
    ours = {(server, b, c) for server in ("ours", "ours-http") for b in (1, 8) for c in (1, 4)}
    expected = ours | {("bare", 1, 1), ("bare", 1, 4)}
    if pytriton:
        expected |= {("triton", b, c) for b in (1, 8) for c in (1, 4)}
        assert result["versions"]["nvidia-pytriton"] != "not used"
    else:
        assert "PyTriton unavailable" in output and result["pytriton_unavailable"]
    assert measured == expected, output[-4000:]
    for m in result["measurements"]:
        assert m["rows_per_second"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0
    assert len(result["load_average_at_start"]) == len(result["load_average_at_end"]) == 3
    assert {"python", "grpcio", "onnxruntime", "tritonclient"} <= set(result["versions"])
    assert "| digits | 1 | 1 |" in result["table"] and "load average" in output


def test_bench_servers_leave_their_log_folder_only_when_the_block_fails(
    tmp_path, monkeypatch, model_repository
):
    """bench/serve.py and bench/score.py start servers through `temporary_server`: its log
    folder in the temporary directory goes when the block ends well and stays, log and all,
    when it fails."""
    from aet.clients.server_process import temporary_server

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with temporary_server(model_repository, "passed-") as server:
        assert server.log_path.parent.parent == tmp_path and server.log_path.exists()
    assert not list(tmp_path.glob("passed-*"))
    with pytest.raises(RuntimeError, match="the block failed"):
        with temporary_server(model_repository, "failed-"):
            raise RuntimeError("the block failed")
    (kept,) = tmp_path.glob("failed-*")
    assert '"event": "server_started"' in (kept / "server.log").read_text()


def test_the_documented_table_novelty_command_trains_the_benchs_table_autoencoder():
    """docs/vectors.md's `aet pretrain` command for a table's novelty score sets what the
    bench measures for that table's width (wine, 13 features): the two cannot drift apart."""
    novelty = load_script("novelty.py")
    text = (ROOT / "docs" / "vectors.md").read_text(encoding="utf-8")
    block = re.search(
        r"```bash\n(aet pretrain --dataset wine .*?--name wine-novelty)\n```", text, re.S
    )
    assert block is not None, "docs/vectors.md lost its table novelty command"
    argv = block.group(1).replace("\\\n", " ").split()[2:]
    parser = argparse.ArgumentParser(allow_abbrev=False)
    configure_parser(parser)
    config = config_of(parser.parse_args(argv))
    width = load_wine().data.shape[1]
    for name, value in novelty.table_autoencoder(width, novelty.TABLE_EPOCHS).items():
        section = config.model if hasattr(config.model, name) else config.training
        given = getattr(section, name)
        assert (tuple(given) if isinstance(given, list) else given) == value, name
