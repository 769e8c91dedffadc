"""The users file: one `address:password-hash` line per mailbox owner.

Passwords are stored only as salted scrypt hashes (memory-hard, in the
stdlib). Several domains may share one file; each line names its full address.
The daemon re-reads a file when it changes on disk, so `mailhost user add`
takes effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from mailhost.durable import write_file_atomically

_log = Logger(namespace="mailhost.users")

# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB of memory per hash.
_SCRYPT_LOG_N = 15
_SCRYPT_R = 8
_SCRYPT_P = 1


class UsersFileError(Exception):
    """A users file that cannot be read or has a malformed line."""


def hash_password(password: str) -> str:
    """A self-describing salted scrypt hash of `password`."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P)
    return f"$scrypt$ln={_SCRYPT_LOG_N},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches the stored hash (constant-time compare)."""
    try:
        _, scheme, params, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=") for item in params.split(","))
        computed = _scrypt(password, _unb64(salt), int(values["ln"]), int(values["r"]), int(values["p"]))
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(computed, _unb64(digest))


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20, dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class UserEntry:
    address: str  # local@domain, lower case
    password_hash: str


def read_users(path: Path) -> dict[str, UserEntry]:
    """All entries of a users file by address; a missing file is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsersFileError(f"{path}: cannot read users file: {e}") from None
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        address, sep, password_hash = line.partition(":")
        if not sep or "@" not in address:
            raise UsersFileError(f"{path}:{number}: expected address:hash")
        entries[address.lower()] = UserEntry(address.lower(), password_hash)
    return entries


def write_users(path: Path, entries: dict[str, UserEntry]) -> None:
    """Replace the users file atomically and durably, readable by its owner only."""
    lines = [f"{e.address}:{e.password_hash}\n" for e in sorted(entries.values(), key=lambda e: e.address)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, "".join(lines).encode("utf-8"), mode=0o600)


class UsersFile:
    """A users file as the daemon sees it: re-read when its stat changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, UserEntry] = {}

    def entries(self) -> dict[str, UserEntry]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._entries = read_users(self.path)
            except UsersFileError as e:
                # Keep serving what was last read correctly; say so once per change.
                _log.error("{error}; keeping the previous users", error=str(e))
        return self._entries
