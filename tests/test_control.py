"""Model control (KServe RepositoryModelLoad / Unload): off unless enabled, then admin-only.

Tried as a new user would: on a default `aet serve`, a raw unload with no token must not take
a model away; with `--model-control`, only the admin token may, through our stubs and through
`tritonclient` (which always sends `unload_dependents`).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import grpc
import pytest
from kserve_harness import (
    ADMIN,
    MODEL,
    add_version,
    digits_pixels,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.config import ConfigError, config_from_mapping
from aet.proto import grpc_service_pb2 as pb
from aet.server.app import ServeConfig

SEED = 1
WAIT = 60
INFERENCE_TOKEN = "inference-token-for-tests"


def serves(stub, metadata=None) -> bool:
    """Whether the model still answers an inference (sent with `metadata`)."""
    request = kserve_request(digits_pixels(2))
    return len(stub.ModelInfer(request, timeout=WAIT, metadata=metadata).outputs) == 1


def test_model_control_is_off_by_default_whatever_the_caller_sends(tmp_path):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, model_control=False, admin_token_file=None)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            for call, request in (
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL)),
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=MODEL)),
            ):
                for metadata in (None, ADMIN):
                    with pytest.raises(grpc.RpcError) as caught:
                        call(request, timeout=WAIT, metadata=metadata)
                    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "--model-control" in caught.value.details()
            assert serves(stub)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=WAIT)
            assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "1", "READY")]
    finally:
        live.stop()


def test_only_the_admin_token_loads_and_unloads(tmp_path):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, tokens=(INFERENCE_TOKEN,))
    inference = [("authorization", f"Bearer {INFERENCE_TOKEN}")]
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            unload = pb.RepositoryModelUnloadRequest(model_name=MODEL)
            refusals = {}
            for name, metadata in (("none", None), ("inference", inference)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.RepositoryModelUnload(unload, timeout=WAIT, metadata=metadata)
                refusals[name] = (caught.value.code(), caught.value.details())
            assert refusals["none"][0] == grpc.StatusCode.UNAUTHENTICATED
            assert refusals["inference"][0] == grpc.StatusCode.PERMISSION_DENIED
            assert "needs an admin token" in refusals["inference"][1]
            assert INFERENCE_TOKEN not in refusals["inference"][1]
            assert serves(stub, inference)

            # The admin token works for inference too, and an unknown parameter is named.
            assert serves(stub, ADMIN)
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(
                        model_name=MODEL,
                        parameters={"cascade": pb.ModelRepositoryParameter(bool_param=True)},
                    ),
                    timeout=WAIT,
                    metadata=ADMIN,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "parameters['cascade']: expected only unload_dependents" in (
                caught.value.details()
            )
            assert live.registry.is_ready(MODEL)
    finally:
        live.stop()


TRITONCLIENT_CONTROL = r"""
import json, sys
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, token = sys.argv[1:]
client = tc.InferenceServerClient(target)
admin = {"authorization": f"Bearer {token}"}
report = {}
try:
    client.unload_model("digits")
except InferenceServerException as exc:
    report["unload without token"] = [exc.status(), exc.message()]
client.unload_model("digits", headers=admin)
report["index after unload"] = client.get_model_repository_index(headers=admin, as_json=True)
client.load_model("digits", headers=admin)
report["ready after load"] = client.is_model_ready("digits", headers=admin)
print(json.dumps(report))
"""


def test_tritonclient_unloads_and_loads_with_the_admin_token(tmp_path):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient missing: pip install --no-deps tritonclient==2.51.0")
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path)
    try:
        token = dict(ADMIN)["authorization"].removeprefix("Bearer ")
        done = subprocess.run(
            [sys.executable, "-c", TRITONCLIENT_CONTROL, live.target, token],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        live.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    status, message = report["unload without token"]
    assert status == "StatusCode.PERMISSION_DENIED"
    assert "needs an admin token" in message
    assert report["index after unload"]["models"] == [
        {"name": MODEL, "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    assert report["ready after load"] is True


@pytest.mark.parametrize(
    "fields",
    [{"model_control": True}, {"admin_token_file": "admin"}],
)
def test_model_control_and_admin_token_file_come_together(fields):
    with pytest.raises(ConfigError, match="model_control, admin_token_file: expected both"):
        config_from_mapping(ServeConfig, fields)
