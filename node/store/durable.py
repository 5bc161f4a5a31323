"""Durable files: the one place that knows how a file survives a crash.

Both the spool (received instances) and the outbox (results) write through here:
data to a temp file in the same directory tree → ``fsync`` → link or rename to the
final name → ``fsync`` of the directory (and of its parent when the directory is
new).  File names are a SHA-256 of the UID, never the UID text, so a UID such as
``../../x`` can never name a path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ensure_dir",
    "fsync_dir",
    "fsync_file",
    "link_durable",
    "remove_durable",
    "sha256_file",
    "uid_path",
    "write_durable",
]


def uid_path(uid: str) -> Path:
    """The relative path of the file of one SOP instance: ``ab/<sha256(uid)>.dcm``.

    One level of 256 directories: a new directory costs two extra fsyncs, so a
    deeper fan-out (65,536 leaves) would make most of the first 100,000 instances
    pay them; ext4/XFS index large directories, so a few million files stay cheap.
    """
    digest = hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()
    return Path(digest[:2], digest + ".dcm")


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` durable (new, renamed or removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the contents of the file at ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` if missing, its own entry in the parent made durable."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def link_durable(tmp: Path, final: Path) -> bool:
    """fsync ``tmp`` → hard-link it to ``final`` → fsync the directory.

    ``link`` never replaces: False when ``final`` already existed (nothing changed).
    The caller removes ``tmp``.
    """
    fsync_file(tmp)
    ensure_dir(final.parent)
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    fsync_dir(final.parent)
    return True


def write_durable(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that it is whole and durable, or absent.

    temp file beside it → fsync → rename over ``target`` → fsync of the directory.
    """
    ensure_dir(target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def remove_durable(paths: Iterable[Path]) -> int:
    """Delete files so that their removal survives a crash: unlink each (a missing one
    is skipped), then fsync each directory that lost an entry, once.

    Returns how many files were removed.
    """
    removed = 0
    dirs: set[Path] = set()
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        dirs.add(path.parent)
    for d in sorted(dirs):
        fsync_dir(d)
    return removed
