"""Regenerate the Python stubs of every `.proto` file in this folder with grpcio-tools.

`python -m aet_proto.generate` rewrites `<name>_pb2.py`, `<name>_pb2.pyi` and
`<name>_pb2_grpc.py` beside each `<name>.proto`. The stubs are committed; `tests/test_proto.py`
regenerates them into a temporary folder and fails when they differ from the committed ones.
The `.proto` files import each other as `"aet_proto/<name>.proto"`, so the generated modules
import each other as `aet_proto.<name>_pb2`.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PACKAGE = "aet_proto"
PACKAGE_DIR = Path(__file__).resolve().parent
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class StubGenerationError(RuntimeError):
    """protoc rejected a `.proto` file or grpcio-tools is not installed."""


def proto_files(proto_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The `.proto` files of the package, sorted by name."""
    return sorted(proto_dir.glob("*.proto"))


def stub_names(proto: Path) -> list[str]:
    """The file names protoc generates for one `.proto` file."""
    return [proto.stem + suffix for suffix in STUB_SUFFIXES]


def generate_stubs(output_root: Path, proto_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Compile every `.proto` in `proto_dir` into `output_root/aet_proto/`; return the stubs.

    `output_root` is the folder that holds the package: `PACKAGE_DIR.parent` regenerates in
    place, a temporary folder gives copies to compare against the committed stubs.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise StubGenerationError(
            "grpcio-tools is needed to generate stubs: pip install 'ae-transfer[test]'") from exc
    protos = proto_files(proto_dir)
    if not protos:
        raise StubGenerationError(f"{proto_dir}: no .proto files")
    (output_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"--proto_path={proto_dir.parent}",
        f"--proto_path={well_known}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        *(f"{PACKAGE}/{proto.name}" for proto in protos),
    ]
    if protoc.main(argv) != 0:
        raise StubGenerationError(f"protoc failed on {', '.join(p.name for p in protos)} "
                                  "(its errors are printed above)")
    return [output_root / PACKAGE / name for proto in protos for name in stub_names(proto)]


def main() -> int:
    """Regenerate the committed stubs in place."""
    for path in generate_stubs(PACKAGE_DIR.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
