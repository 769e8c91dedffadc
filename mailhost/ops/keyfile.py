"""Secret keys kept in state_dir: random bytes, made once (0600), never replaced.

Used for the keys whose output outlives a restart: unsubscribe links in mail already sent
(feedback.unsubscribe) and SRS return paths of forwarded mail (feedback.srs). Two processes
that make the same key at once end with one key: the file is linked into place, never
renamed over another.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailhost.ops.durable import fsync_directory, write_and_sync
from mailhost.ops.ownership import Owner, give


class KeyFileError(Exception):
    """A key file that cannot be used; str(error) says which file and what to do."""


def read_secret(path: Path, size: int, what: str) -> bytes | None:
    """The key in `path` (`size` bytes), or None when none was made yet; `what` names its use
    in the error ("an unsubscribe key")."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror}") from None
    if len(key) != size:
        raise KeyFileError(f"{path}: not {what} ({size} bytes); restore it from a backup, or remove it to make "
                           f"a new one (what was made with the old one stops working)")
    return key


def ensure_secret(path: Path, size: int, what: str, owner: Owner | None = None) -> bytes:
    """The key in `path`, made on first use (0600, given to `owner`) and kept for good."""
    key = read_secret(path, size, what)
    if key is not None:
        return key
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_and_sync(str(temporary), [os.urandom(size)], 0o600, owner)
    try:
        os.link(temporary, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    fsync_directory(path.parent)
    give(path, owner)
    key = read_secret(path, size, what)
    if key is None:
        raise KeyFileError(f"{path}: vanished while being made")
    return key
