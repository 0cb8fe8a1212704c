"""The distribution installs one top-level package, `aet`, holding the layout's folders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_aet_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("ae_transfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"aet"}
    for module in (
        "aet/training/pretrain.py",
        "aet/server/app.py",
        "aet/clients/client.py",
        "aet/proto/embedding_pb2.py",
        "aet/proto/embedding.proto",
        "aet/cli.py",
        "aet/training/recipes/images.toml",
        "aet/exported/digits/1/model.onnx",  # the shipped encoder: `aet demo` outside a checkout
        "aet/exported/digits/1/model.json",
        "aet/exported/digits/1/calibration.npy",
    ):
        assert module in names
