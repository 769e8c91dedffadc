"""The users file: one `address:password-hash` line per mailbox owner.

A line may go on with options, `:name=value` each; the only one is
`may_send_as=a@x,@y` (addresses, or whole domains written `@domain`, this user
may also send as on the submission ports). Lines without options are what
earlier versions wrote, and still mean the same.

Passwords are stored only as salted scrypt hashes (memory-hard, in the
stdlib). Several domains may share one file; each line names its full address.
The daemon re-reads a file when it changes on disk (and on SIGHUP), so
`mailhost user add` takes effect without a restart.
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

from mailhost.ops.durable import write_file_atomically

_log = Logger(namespace="mailhost.users")

# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB of memory per hash.
_SCRYPT_LOG_N = 15
_SCRYPT_R = 8
_SCRYPT_P = 1


class UsersFileError(Exception):
    """A users file that cannot be read or has a malformed line."""


def hash_password(password: str, log_n: int = _SCRYPT_LOG_N) -> str:
    """A self-describing salted scrypt hash of `password` (a lower `log_n` only for tests)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log_n, _SCRYPT_R, _SCRYPT_P)
    return f"$scrypt$ln={log_n},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


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
    may_send_as: tuple[str, ...] = ()  # lower case "a@x" or "@domain"


def parse_send_as(text: str) -> tuple[str, ...]:
    """Parse "a@x,@y" into ("a@x", "@y"); ValueError names an entry that is not an address or @domain."""
    result = []
    for item in text.split(","):
        item = item.strip().lower()
        domain = item.rpartition("@")[2]
        if item.count("@") != 1 or "." not in domain or any(c in item for c in " :<>\0"):
            raise ValueError(item or "(empty)")
        result.append(item)
    return tuple(dict.fromkeys(result))


def _format_line(entry: UserEntry) -> str:
    options = f":may_send_as={','.join(entry.may_send_as)}" if entry.may_send_as else ""
    return f"{entry.address}:{entry.password_hash}{options}\n"


def _parse_line(path: Path, number: int, line: str) -> UserEntry:
    address, sep, rest = line.partition(":")
    if not sep or "@" not in address:
        raise UsersFileError(f"{path}:{number}: expected address:hash")
    # scrypt hashes hold no ":", so what follows the hash are options.
    password_hash, *options = rest.split(":")
    may_send_as: tuple[str, ...] = ()
    for option in options:
        name, eq, value = option.partition("=")
        if name.strip() != "may_send_as" or not eq:
            raise UsersFileError(f"{path}:{number}: unknown option {name.strip()!r} (allowed: may_send_as=a@x,@y)")
        try:
            may_send_as = parse_send_as(value)
        except ValueError as e:
            raise UsersFileError(f"{path}:{number}: may_send_as: {e} is not an address or @domain") from None
    return UserEntry(address.lower(), password_hash, may_send_as)


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
        entry = _parse_line(path, number, line)
        entries[entry.address] = entry
    return entries


def write_users(path: Path, entries: dict[str, UserEntry]) -> None:
    """Replace the users file atomically and durably, readable by its owner only."""
    lines = [_format_line(e) for e in sorted(entries.values(), key=lambda e: e.address)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, "".join(lines).encode("utf-8"), mode=0o600)


class UsersFile:
    """A users file as the daemon sees it: re-read when its stat changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, UserEntry] = {}

    def forget(self) -> None:
        """Read the file again at the next look, changed or not (SIGHUP)."""
        self._stamp = None

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
