"""The users file: one `address:password-hash` line per mailbox owner.

A line may go on with options, `:name=value` each: `may_send_as=a@x,@y`
(addresses, or whole domains written `@domain`, this user may also send as on
the submission ports) and `admin=yes` (may log in to the web console,
`mailhost user admin`). Lines without options are what earlier versions wrote,
and still mean the same.

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
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import Owner, make_dirs

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
    admin: bool = False  # may log in to the web console


LOCAL_PART_MAX = 64  # octets (RFC 5321 4.5.3.1.1)

# RFC 5321 4.1.2 Local-part: a Dot-string, or a Quoted-string; with RFC 6531, UTF-8 in both.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+"
_LOCAL_PART = re.compile(rf'{_ATOM}(?:\.{_ATOM})*|"(?P<quoted>(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*)"')


def parse_local_part(text: str) -> str:
    """The mailbox name for the local part `text` as typed (quoting undone, lower case).

    ValueError says why it cannot name a mailbox: not RFC 5321 syntax, too long, or a character
    the users file (":" ends the address, "#" starts a comment, a line per user), the Maildir
    folder ("/", a leading dot) or plus-addressing ("+") gives a meaning of its own."""
    match = _LOCAL_PART.fullmatch(text)
    if match is None:
        raise ValueError(local_part_problem(text) or
                         "is not an RFC 5321 local part (letters, digits, !#$%&'*-/=?^_`{|}~ and single dots)")
    if len(text.encode("utf-8")) > LOCAL_PART_MAX:
        raise ValueError(f"is longer than {LOCAL_PART_MAX} octets (RFC 5321 4.5.3.1.1)")
    bare = re.sub(r"\\(.)", r"\1", match.group("quoted")) if match.group("quoted") is not None else text
    problem = local_part_problem(bare)
    if problem:
        raise ValueError(problem)
    return bare.lower()


def local_part_problem(bare: str) -> str | None:
    """Why the mailbox name `bare` (quoting undone) cannot be stored, or None when it can."""
    if not bare:
        return "is empty"
    if len(bare.encode("utf-8")) > LOCAL_PART_MAX:
        return f"is longer than {LOCAL_PART_MAX} octets (RFC 5321 4.5.3.1.1)"
    for char, why in ((":", "a :"), ("@", "an @"), ("/", "a /"), ("+", "a + (plus-addressing: alice+tag is alice's)")):
        if char in bare:
            return f"has {why}"
    if not bare.isprintable() or any(c.isspace() for c in bare):
        return "has a space or a control character"
    if bare.startswith("."):
        return "starts with a dot"
    if bare.startswith("#"):
        return "starts with # (a comment in the users file)"
    return None


def parse_send_as(text: str) -> tuple[str, ...]:
    """Parse "a@x,@y" into ("a@x", "@y"); ValueError names an entry that is not an address or @domain."""
    result = []
    for item in text.split(","):
        item = item.strip().lower()
        domain = item.rpartition("@")[2]
        if item.count("@") != 1 or "." not in domain or any(c in item for c in " :<>\0") or not item.isprintable():
            raise ValueError(item or "(empty)")
        result.append(item)
    return tuple(dict.fromkeys(result))


def _format_line(entry: UserEntry) -> str:
    options = f":may_send_as={','.join(entry.may_send_as)}" if entry.may_send_as else ""
    if entry.admin:
        options += ":admin=yes"
    return f"{entry.address}:{entry.password_hash}{options}\n"


def _address_problem(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if not at or not domain:
        return "is not an address such as alice@example.test"
    problem = local_part_problem(local)
    return f"has a local part that {problem}" if problem else None


def _parse_line(path: Path, number: int, line: str) -> UserEntry:
    address, sep, rest = line.partition(":")
    if not sep or "@" not in address:
        raise UsersFileError(f"{path}:{number}: expected address:hash")
    problem = _address_problem(address)
    if problem:
        raise UsersFileError(f"{path}:{number}: {address!r} {problem}; fix or remove that line")
    # scrypt hashes hold no ":", so what follows the hash are options.
    password_hash, *options = rest.split(":")
    may_send_as: tuple[str, ...] = ()
    admin = False
    for option in options:
        name, eq, value = option.partition("=")
        if name.strip() == "admin" and eq and value.strip() in ("yes", "no"):
            admin = value.strip() == "yes"
            continue
        if name.strip() != "may_send_as" or not eq:
            raise UsersFileError(f"{path}:{number}: unknown option {name.strip()!r} "
                                 "(allowed: may_send_as=a@x,@y and admin=yes)")
        try:
            may_send_as = parse_send_as(value)
        except ValueError as e:
            raise UsersFileError(f"{path}:{number}: may_send_as: {e} is not an address or @domain") from None
    return UserEntry(address.lower(), password_hash, may_send_as, admin)


def read_users(path: Path) -> dict[str, UserEntry]:
    """All entries of a users file by address; a missing file is empty.
    UsersFileError for a file that cannot be read or for its first malformed line."""
    entries, errors = read_users_leniently(path)
    if errors:
        raise errors[0]
    return entries


def read_users_leniently(path: Path) -> tuple[dict[str, UserEntry], list[UsersFileError]]:
    """The well-formed entries, and an error naming each malformed line (the daemon's read:
    one bad line must not make every user unknown). A file that cannot be read is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, []
    except PermissionError:
        raise UsersFileError(f"{path}: cannot read users file: permission denied "
                             f"(run this as root or as the owner of {path})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsersFileError(f"{path}: cannot read users file: {e}") from None
    entries = {}
    errors = []
    # Lines as the file has them: str.splitlines would also split at \x1c, \x85, U+2028 ...
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = _parse_line(path, number, line)
        except UsersFileError as e:
            errors.append(e)
            continue
        entries[entry.address] = entry
    return entries, errors


def write_users(path: Path, entries: dict[str, UserEntry], owner: Owner | None = None) -> None:
    """Replace the users file atomically and durably, readable by its owner only (`owner`: the
    daemon's user, when root writes it).
    An entry the file could not hold as one line is refused (UsersFileError) and nothing is written."""
    for entry in entries.values():
        problem = _address_problem(entry.address)
        if problem is None and any(c in entry.password_hash for c in ":\n\r"):
            problem = "has a password hash with a : or a line break"
        if problem is None and entry.may_send_as:
            try:
                parse_send_as(",".join(entry.may_send_as))
            except ValueError as e:
                problem = f"may_send_as: {e} is not an address or @domain"
        if problem:
            raise UsersFileError(f"{path}: {entry.address!r} {problem}; nothing written")
    lines = [_format_line(e) for e in sorted(entries.values(), key=lambda e: e.address)]
    try:
        make_dirs(path.parent, 0o755, owner)
        write_file_atomically(path, "".join(lines).encode("utf-8"), mode=0o600, owner=owner)
    except OSError as e:  # a full disk, no permission: say which file
        raise UsersFileError(f"{path}: cannot write the users file: {e.strerror or e}") from None


class UsersFile:
    """A users file as the daemon sees it: re-read when its stat changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, UserEntry] = {}
        self._whole = False  # whether _entries is a whole file, every line well-formed

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
                entries, errors = read_users_leniently(self.path)
            except UsersFileError as e:
                # Keep serving what was last read correctly; say so once per change.
                _log.error("{error}; keeping the previous users", error=str(e))
                return self._entries
            if not errors:
                self._entries, self._whole = entries, True
            elif self._whole:
                # An edit broke a line: keep serving what was last read whole; say so once per change.
                for error in errors:
                    _log.error("{error}; keeping the previous users", error=str(error))
            else:
                # Never read whole (a daemon started on a broken file): the good lines, rather than
                # no user at all (550 5.1.1 for every real user).
                self._entries = entries
                for error in errors:
                    _log.error("{error}; that line is left out", error=str(error))
        return self._entries
