"""Files a running daemon rereads when another process has replaced them (the suppression
list, the API keys): the CLI writes them atomically under a lock, the daemon notices."""

from __future__ import annotations

import os
from pathlib import Path

Identity = tuple[int, int, int, int]


def identity_of(st: os.stat_result) -> Identity:
    """What tells a replaced or rewritten file from the one read last."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_if_changed(path: Path, known: Identity | None, limit: int = -1) -> tuple[Identity, bytes] | None:
    """The file's identity and bytes (at most `limit`) when it is not the one `known`, else None.

    One stat settles the unchanged case, which is the usual one for a lookup per queued
    message; the identity returned is that of the file actually read. FileNotFoundError when
    there is no file; other OSErrors as they come."""
    if identity_of(os.stat(path)) == known:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        identity = identity_of(os.fstat(fd))
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(limit)
    finally:
        os.close(fd)
    return identity, data
