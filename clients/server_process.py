"""`aet serve` as a child process on a free 127.0.0.1 port: started, awaited, stopped gracefully.

Used by `aet demo` and by `bench/serve.py` and `bench/score.py`, which need a real server in
its own process.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aet.errors import UserError

START_SECONDS = 120.0  # the server imports onnxruntime and warms each model up
STOP_SECONDS = 30.0


class ServerStartError(UserError):
    """The child server exited or never reported SERVING."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


class ServerProcess:
    """`aet serve --repository REPOSITORY [flags]` in a child process, its log in `log_path`;
    no drain window unless `flags` set one."""

    def __init__(self, repository: Path, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        command = [
            sys.executable,
            "-m",
            "aet.cli",
            "serve",
            "--repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--drain-seconds",  # no load balancer in front: stop refusing at once
            "0",
            *flags,
        ]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_until_serving(self, model: str = "", timeout: float = START_SECONDS) -> None:
        """Block until health reports `model` ("" = the whole server) SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"aet serve exited with code "
                        f"{self.process.returncode} before serving; "
                        f"see {self.log_path}"
                    )
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service=model), timeout=1.0
                    ).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.2)
        raise ServerStartError(
            f"aet serve: {model or 'server'!r} not SERVING after "
            f"{timeout:.0f} s; see {self.log_path}"
        )

    def stop(self) -> int:
        """SIGTERM, then wait for the graceful shutdown; the exit code (killed if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def temporary_server(
    repository: Path, prefix: str, *flags: str, model: str = ""
) -> Iterator[ServerProcess]:
    """A `ServerProcess` SERVING `model` ("" = the whole server), its log in a fresh temporary
    folder named `prefix`...; stopped when the block ends. The folder is removed when the block
    ends without an error and kept otherwise, since its log says why."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    with ServerProcess(repository, folder / "server.log", *flags) as server:
        server.wait_until_serving(model)
        yield server
    shutil.rmtree(folder, ignore_errors=True)
