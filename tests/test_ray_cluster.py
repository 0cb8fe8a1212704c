"""`aet embed --ray --ray-address` against a real Ray cluster: a head and a worker node started
with `ray start` on 127.0.0.1 in their own sessions, each with one CPU, stopped by the test
whatever happens. Every row comes back exactly once, with the local backend's embeddings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_MODEL

from aet.clients.backends import LocalBackend
from aet.clients.embeddings import read_embeddings
from aet.clients.extract import EmbedConfig, extract
from aet.clients.server_process import free_port
from aet.training.dataspec import DataSpec

ROWS = 300
START_SECONDS = 180.0  # a node imports Ray and starts its processes: slow on a busy machine


def _session_members(session: int) -> list[int]:
    """The processes still alive in session `session` (a node started with its own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class RayNode:
    """`ray start ... --block` in a new session; `stop()` kills that session's processes."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--block"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # loopback only; no token to share
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_until_started(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> list[int]:
        """Kill every process of the node's session; returns those that outlived SIGKILL."""
        session = self.process.pid
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pid in _session_members(session):  # any that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while _session_members(session) and time.monotonic() < deadline:
            time.sleep(0.1)
        return _session_members(session)


@pytest.fixture
def ray_cluster(tmp_path) -> Iterator[str]:
    """The address of a two-node Ray cluster on 127.0.0.1, stopped after the test."""
    # Ray's socket paths must fit in 107 bytes: a short folder under /tmp, not tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    address = f"127.0.0.1:{free_port()}"
    nodes: list[RayNode] = []
    try:
        nodes.append(
            RayNode(
                tmp_path / "head.log",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={address.rsplit(':', 1)[1]}",
                "--num-cpus=1",
                f"--temp-dir={temp}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            )
        )
        nodes[0].wait_until_started()
        nodes.append(RayNode(tmp_path / "worker.log", f"--address={address}", "--num-cpus=1"))
        nodes[1].wait_until_started()
        yield address
    finally:
        survivors = [pid for node in reversed(nodes) for pid in node.stop()]
        shutil.rmtree(temp, ignore_errors=True)
        assert not survivors, f"Ray processes outlived the cluster: {survivors}"


def test_embed_on_a_real_ray_cluster_gives_every_row_once(tmp_path, ray_cluster, model_repository):
    model_dir = model_repository / DIGITS_MODEL
    output = tmp_path / "cluster.parquet"
    command = [
        sys.executable,
        "-m",
        "aet.cli",
        "embed",
        "--ray",
        str(model_dir),
        "--ray-address",
        ray_cluster,
        "--workers",
        "1",  # one actor: the other CPU reads and writes
        "--limit",
        str(ROWS),
        "--shard-size",
        "64",
        "--output",
        str(output),
        "--no-progress",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {ROWS} rows to {output}" in done.stdout

    table = read_embeddings(output)
    np.testing.assert_array_equal(table.ids, np.arange(ROWS))  # each row exactly once
    assert len(list(output.glob("*.parquet"))) >= 5  # written by the workers, per block
    local = tmp_path / "local.npz"
    with LocalBackend(model_dir) as backend:
        extract(
            EmbedConfig(local=model_dir, data=DataSpec(limit=ROWS), output=local, progress=False),
            backend,
        )
    reference = read_embeddings(local)
    np.testing.assert_allclose(table.embeddings, reference.embeddings, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(table.split, reference.split)
    np.testing.assert_array_equal(table.labels, reference.labels)
