"""Local domains: who a local address is (users, aliases, plus-addressing,
catch-all, postmaster) and crash-safe delivery into Maildir folders."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailhost.config import Config, DomainConfig
from mailhost.ops.durable import fsync_directory, write_and_sync
from mailhost.ops.ownership import Owner, make_dirs
from mailhost.local.users import UserEntry, UsersFile

PLUS_SEPARATOR = "+"
ALIAS_DEPTH_MAX = 10
_MAILDIR_SUBDIRS = ("tmp", "new", "cur")


@dataclass(frozen=True)
class Mailbox:
    """One local user's Maildir."""

    address: str  # user@domain, lower case
    path: Path


@dataclass
class Resolution:
    """Where one recipient's mail goes after aliases are expanded."""

    mailboxes: list[Mailbox] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    bounce_for: str | None = None  # a VERP bounce address: the recipient the bounce is about
    unsubscribe: tuple[str, str] | None = None  # an unsubscribe+TOKEN address: (recipient, sender domain)

    @property
    def found(self) -> bool:
        return bool(self.mailboxes or self.remote or self.bounce_for or self.unsubscribe)


def is_safe_local_part(local: str) -> bool:
    """A local part that can name a folder: no path separator, NUL, or dot-only name."""
    return bool(local) and "/" not in local and "\0" not in local and not local.startswith(".")


class LocalDomains:
    """The configured local domains and their users, as the daemon sees them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._domains = {d.name: d for d in config.domains}
        self._users = {path: UsersFile(path) for path in {d.users for d in config.domains}}

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self._domains

    @property
    def primary(self) -> str:
        return self.config.domains[0].name

    def user(self, address: str) -> UserEntry | None:
        """The users-file entry of `address` (a user of a local domain), or None."""
        domain = address.rpartition("@")[2].lower()
        if domain not in self._domains:
            return None
        return self._users[self._domains[domain].users].entries().get(address.lower())

    def replace(self, config: Config) -> None:
        """Take a reloaded configuration's domains, aliases and users files (SIGHUP)."""
        users = {path: self._users.get(path) or UsersFile(path) for path in {d.users for d in config.domains}}
        self.config, self._domains, self._users = config, {d.name: d for d in config.domains}, users

    def reload_users(self) -> None:
        """Re-read every users file now (SIGHUP), changed on disk or not; a broken one is logged."""
        for users in self._users.values():
            users.forget()
            users.entries()

    def resolve(self, local: str, domain: str, catch_all: bool = True) -> Resolution:
        """Expand `local@domain` (a local domain) into mailboxes and remote addresses.

        catch_all=False: only users and aliases count (who owns an address, not
        where unknown mail ends up).
        """
        resolution = Resolution()
        self._expand(local.lower(), domain.lower(), resolution, depth=0, seen=set(), catch_all=catch_all)
        return resolution

    def _expand(self, local: str, domain: str, out: Resolution, depth: int, seen: set[str], catch_all: bool = True) -> None:
        key = f"{local}@{domain}"
        if key in seen or depth > ALIAS_DEPTH_MAX:
            return  # an alias loop, or a name already expanded in this resolution
        seen.add(key)
        config = self._domains[domain]
        users = self._users[config.users].entries()
        base = local.split(PLUS_SEPARATOR, 1)[0] if PLUS_SEPARATOR in local else None
        for name in (local, base):
            if name is None or not is_safe_local_part(name):
                continue
            if name in config.aliases:
                for target in config.aliases[name]:
                    self._expand_target(target, domain, out, depth, seen, catch_all)
                return
            if f"{name}@{domain}" in users:
                self._add_mailbox(out, config, name)
                return
        found_before = len(out.mailboxes) + len(out.remote)
        if config.catch_all is not None and catch_all:
            self._expand(config.catch_all, domain, out, depth + 1, seen)
        if local == "postmaster" and len(out.mailboxes) + len(out.remote) == found_before:
            # RFC 5321 4.5.1: postmaster is always accepted; without a user, alias
            # or catch-all to take it, it gets a Maildir of its own.
            self._add_mailbox(out, config, "postmaster")

    def _expand_target(self, target: str, domain: str, out: Resolution, depth: int, seen: set[str], catch_all: bool) -> None:
        # A target without @ is a name in the same domain: a user, an alias or a plus-address.
        target_local, _, target_domain = target.rpartition("@") if "@" in target else (target, "@", domain)
        if self.is_local(target_domain):
            self._expand(target_local.lower(), target_domain.lower(), out, depth + 1, seen, catch_all)
        elif target not in out.remote:
            out.remote.append(target)

    @staticmethod
    def _add_mailbox(out: Resolution, config: DomainConfig, name: str) -> None:
        mailbox = Mailbox(f"{name}@{config.name}", config.maildir / name)
        if mailbox not in out.mailboxes:
            out.mailboxes.append(mailbox)


def create_maildir(path: Path, owner: Owner | None = None) -> list[Path]:
    """Make `path`/{tmp,new,cur}, owner-only, if missing (each folder made given to `owner`);
    returns the folders it made, outermost first.

    A new Maildir appears whole: its folders are made under a hidden name beside it and
    renamed into place, so a reader that sees it (Python's mailbox, mutt) finds new/ and cur/
    too. Made one by one, a reader polling for a first message could find the folder without
    cur/ and fail. (No user's folder starts with a dot: is_safe_local_part.)"""
    created: list[Path] = []
    if not path.is_dir():
        created = make_dirs(path.parent, 0o700, owner)
        staging = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.new")
        try:
            for sub in _MAILDIR_SUBDIRS:
                make_dirs(staging / sub, 0o700, owner)
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not path.is_dir():  # not made meanwhile by another delivery: a real failure
                raise
        else:
            return created + [path, *(path / sub for sub in _MAILDIR_SUBDIRS)]
    for sub in _MAILDIR_SUBDIRS:  # an existing folder: whatever of it is missing
        created += make_dirs(path / sub, 0o700, owner)
    return created


def _write_into_tmp(mailbox: Mailbox, name: str, chunks: tuple[bytes, bytes]) -> str:
    tmp = f"{mailbox.path}/tmp/{name}"
    try:
        write_and_sync(tmp, chunks)
    except FileNotFoundError:
        # First delivery to this mailbox: make its Maildir, then try once more.
        create_maildir(mailbox.path)
        write_and_sync(tmp, chunks)
    return tmp


_hostname = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
_sequence = itertools.count()


def _unique_name() -> str:
    # The Maildir naming rule: time.MusecPpidQcount.host, unique on this host.
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_sequence)}.{_hostname}"


@dataclass(frozen=True)
class Copy:
    """One delivered copy: the mailbox and the header lines written above the body."""

    mailbox: Mailbox
    headers: bytes


def deliver_copies(copies: list[Copy], body: bytes) -> list[str]:
    """Durably write `body`, each copy with its own header lines, into the
    copies' Maildirs (blocking; run it on a disk thread). Returns the new/ paths.

    Every file and every new/ directory is fsync'd before this returns; on any
    error nothing of this message is left in new/ and the error is raised.
    Concurrent deliveries fsync in parallel threads and the filesystem journal
    commits them together.
    """
    placed = _write_copies(copies, body, [_unique_name() for _ in copies])
    try:
        for directory in {os.path.dirname(p) for p in placed}:
            fsync_directory(directory)
    except BaseException:
        remove_delivered(placed)
        raise
    return placed


def _write_copies(copies: list[Copy], body: bytes, names: list[str]) -> list[str]:
    temporary: list[tuple[str, str]] = []
    placed: list[str] = []
    try:
        for copy, name in zip(copies, names):
            tmp = _write_into_tmp(copy.mailbox, name, (copy.headers, body))
            temporary.append((tmp, f"{copy.mailbox.path}/new/{name}"))
        # Only once every copy is safely written do any of them appear in new/.
        for tmp, new in temporary:
            os.rename(tmp, new)
            placed.append(new)
    except BaseException:
        remove_delivered([tmp for tmp, _ in temporary] + placed)
        raise
    return placed


def remove_delivered(paths: list[str]) -> None:
    """Take back copies (when the rest of the transaction failed)."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
