"""Regenerate the Python stubs of every `.proto` file in this folder with grpcio-tools.

`python -m aet.proto.generate` rewrites `<name>_pb2.py`, `<name>_pb2.pyi` and
`<name>_pb2_grpc.py` beside each `<name>.proto`. The stubs are committed; `tests/test_proto.py`
regenerates them into a temporary folder and fails when they differ from the committed ones.
The `.proto` files import each other as `"aet/proto/<name>.proto"`, so the generated modules
import each other as `aet.proto.<name>_pb2`: protoc compiles copies staged under `aet/proto/` in
a temporary folder, because the installed package `aet.proto` lives in the top-level `proto/`.
Each `_pb2.py` is then pointed at the package's own descriptor pool (`aet.proto.descriptors`),
so that our `inference` package and tritonclient's can be imported in one process.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE_PATH = Path("aet", "proto")
PACKAGE_DIR = Path(__file__).resolve().parent
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
DEFAULT_POOL_IMPORT = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
PRIVATE_POOL_IMPORT = "from aet.proto.descriptors import POOL as _POOL\n"
DEFAULT_POOL_ADD = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_ADD = "_POOL.AddSerializedFile("


class StubGenerationError(RuntimeError):
    """protoc rejected a `.proto` file or grpcio-tools is not installed."""


def proto_files(proto_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The `.proto` files of the package, sorted by name."""
    return sorted(proto_dir.glob("*.proto"))


def stub_names(proto: Path) -> list[str]:
    """The file names protoc generates for one `.proto` file."""
    return [proto.stem + suffix for suffix in STUB_SUFFIXES]


def generate_stubs(output_dir: Path, proto_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Compile every `.proto` in `proto_dir` into stubs in `output_dir`; return the stubs.

    `PACKAGE_DIR` regenerates in place, a temporary folder gives copies to compare against the
    committed stubs.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise StubGenerationError(
            "grpcio-tools is needed to generate stubs: pip install 'ae-transfer[test]'"
        ) from exc
    protos = proto_files(proto_dir)
    if not protos:
        raise StubGenerationError(f"{proto_dir}: no .proto files")
    output_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as staging:
        source_root, out_root = Path(staging, "src"), Path(staging, "out")
        (source_root / PACKAGE_PATH).mkdir(parents=True)
        (out_root / PACKAGE_PATH).mkdir(parents=True)
        for proto in protos:
            shutil.copy2(proto, source_root / PACKAGE_PATH / proto.name)
        argv = [
            "grpc_tools.protoc",
            f"--proto_path={source_root}",
            f"--proto_path={well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *(str(PACKAGE_PATH / proto.name) for proto in protos),
        ]
        if protoc.main(argv) != 0:
            raise StubGenerationError(
                f"protoc failed on {', '.join(p.name for p in protos)} "
                "(its errors are printed above)"
            )
        stubs = [name for proto in protos for name in stub_names(proto)]
        for name in stubs:
            text = (out_root / PACKAGE_PATH / name).read_text(encoding="utf-8")
            if name.endswith("_pb2.py"):
                text = use_private_pool(text, name)
            (output_dir / name).write_text(text, encoding="utf-8")
    return [output_dir / name for name in stubs]


def use_private_pool(source: str, name: str) -> str:
    """A generated `_pb2.py` made to register in `aet.proto.descriptors.POOL`."""
    if source.count(DEFAULT_POOL_IMPORT) != 1 or source.count(DEFAULT_POOL_ADD) != 1:
        raise StubGenerationError(
            f"{name}: expected protoc's default-pool registration "
            f"({DEFAULT_POOL_ADD.strip('(')}) once, got another layout; update generate.py"
        )
    return source.replace(DEFAULT_POOL_IMPORT, PRIVATE_POOL_IMPORT).replace(
        DEFAULT_POOL_ADD, PRIVATE_POOL_ADD
    )


def main() -> int:
    """Regenerate the committed stubs in place."""
    for path in generate_stubs(PACKAGE_DIR):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
