"""Files written whole or not at all, with the permissions the user's umask gives.

Temporary files and folders are hidden (`.`), sit beside their target and carry the writer's
host and pid in their name (`.<name>.<host>.<pid>.<random>.tmp`, `.tmp-<host>.<pid>.<random>`),
so a later writer can tell a dead writer's leftovers from a live writer's work
(`remove_stale`). They are created with mode 0666 / 0777 less the umask, as `open` and `mkdir`
would create the target itself (mkstemp's 0600 would hide outputs from their readers).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


def _owner_tag() -> str:
    """`<host>.<pid>`: who writes a temporary file (dots in the host name become '-')."""
    return f"{socket.gethostname().replace('.', '-')}.{os.getpid()}"


def temporary_file(target: Path) -> Path:
    """Create an empty hidden file beside `target`, named for this writer; umask honoured."""
    path = target.parent / f".{target.name}.{_owner_tag()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


def temporary_folder(parent: Path, prefix: str) -> Path:
    """Create a hidden folder `<prefix><host>.<pid>.<random>` in `parent`; umask honoured."""
    path = parent / f"{prefix}{_owner_tag()}.{secrets.token_hex(4)}"
    path.mkdir(mode=0o777)
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)`, fsync, then rename the finished file onto `path`; on any
    failure the temporary file is removed and nothing is at `path` that was not there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_file(path)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _writer_is_gone(tag: str) -> bool:
    """Whether the writer `<host>.<pid>` was on this host and its process has ended."""
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname().replace(".", "-") or not pid.isdigit():
        return False  # another host's writer (or an unknown name): never ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the entries `<prefix><host>.<pid>.<random>` in `folder` whose writer process on
    this host has ended (never a live writer's, never another host's); the removed paths."""
    removed = []
    for entry in folder.glob(f"{prefix}*"):
        tag = entry.name[len(prefix) :].rpartition(".")[0]
        if not _writer_is_gone(tag):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
