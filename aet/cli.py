"""`aet <command>`: dispatch to the module that owns each stage of the data flow.

Each command module exposes `configure_parser(parser)` and `run(args) -> int`. Modules are
imported only when their command runs, so `aet serve` never imports torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from aet.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("aet.training.pretrain", "pretrain an autoencoder on a data set"),
    "export": ("aet.training.export", "export a trained encoder to the ONNX model repository"),
    "serve": ("aet.server.app", "serve the model repository over gRPC"),
    "triton": ("aet.server.triton", "write an exported model as a Triton model repository"),
    "embed": ("aet.clients.extract", "batch feature extraction (server, local onnxruntime or Ray)"),
    "probe": ("aet.clients.probe", "train classifiers on frozen embeddings"),
    "head": ("aet.clients.head", "fit a classifier on an encoder and export both as one model"),
    "predict": ("aet.clients.predict", "batch classification (server, local onnxruntime or Ray)"),
    "demo": ("aet.clients.demo", "the whole flow on the embedded default data"),
}


# A full or read-only disk is the user's to fix: one line, exit 2 (writers leave no half file).
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def main(argv: list[str] | None = None, commands: tuple[str, ...] | None = None) -> int:
    """Run one `aet` command; `commands` restricts the choice (for `python -m <package>`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    allowed = {name: COMMANDS[name] for name in (commands or COMMANDS)}
    parser = argparse.ArgumentParser(prog="aet", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=sorted(allowed),
        help="; ".join(f"{name}: {text}" for name, (_, text) in allowed.items()),
    )
    if not argv or argv[0] not in allowed:
        parser.parse_args(argv[:1])  # prints usage and the valid commands, then exits
        return 2
    module = importlib.import_module(allowed[argv[0]][0])
    # No abbreviations: a prefix (`--data`, `--val`) must not silently pick one of several flags.
    sub = argparse.ArgumentParser(
        prog=f"aet {argv[0]}", description=allowed[argv[0]][1], allow_abbrev=False
    )
    module.configure_parser(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"aet {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"aet {argv[0]}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
