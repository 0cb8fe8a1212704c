"""Regenerate `kserve_crd_schemas.json`: KServe's CRD schemas, pruned to what our manifests use.

    python tests/deploy/prune_kserve_crds.py <kserve checkout> [<commit>]

KServe's full CRDs (charts/kserve-crd/templates/serving.kserve.io_*.yaml) are megabytes, most
of it the Pod spec inlined again for every framework. This keeps, at every level our manifests
in deploy/kserve/ reach, the complete list of field names KServe accepts (with types, enums and
required fields) and closes it (`additionalProperties: false`), so that a misspelt or unknown
field fails tests/test_deploy.py. Fields KServe has but our manifests do not use are kept as
names only (`{"x-pruned": true}`): a manifest that starts to use one fails the test until this
script is run again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE.parents[1] / "deploy" / "kserve"
CRDS = {
    "ServingRuntime": "charts/kserve-crd/templates/serving.kserve.io_servingruntimes.yaml",
    "InferenceService": "charts/kserve-crd/templates/serving.kserve.io_inferenceservices.yaml",
}
KEEP = ("type", "enum", "required", "format", "x-kubernetes-int-or-string", "anyOf")


def prune(schema: dict, docs: list) -> dict:
    out = {k: schema[k] for k in KEEP if k in schema}
    if "properties" in schema:
        used = [d for d in docs if isinstance(d, dict)]
        out["properties"] = {
            key: prune(sub, [d[key] for d in used if key in d])
            if any(key in d for d in used)
            else {"x-pruned": True}
            for key, sub in sorted(schema["properties"].items())
        }
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    elif isinstance(schema.get("additionalProperties"), dict):
        values = [v for d in docs if isinstance(d, dict) for v in d.values()]
        out["additionalProperties"] = prune(schema["additionalProperties"], values)
    if "items" in schema:
        items = [i for d in docs if isinstance(d, list) for i in d]
        out["items"] = prune(schema["items"], items)
    return out


def main(checkout: Path, commit: str = "HEAD") -> None:
    manifests = [
        doc
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    result = {}
    for kind, path in CRDS.items():
        text = subprocess.run(
            ["git", "-C", str(checkout), "show", f"{commit}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        crd = next(
            d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition"
        )
        sha = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", commit],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        docs = [m for m in manifests if m.get("kind") == kind]
        versions = {}
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                versions[version["name"]] = prune(version["schema"]["openAPIV3Schema"], docs)
        result[kind] = {
            "source": f"github.com/kserve/kserve@{sha}:{path}",
            "group": crd["spec"]["group"],
            "versions": versions,
        }
    (HERE / "kserve_crd_schemas.json").write_text(
        json.dumps(result, indent=1, sort_keys=True) + "\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
