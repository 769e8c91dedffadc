"""API keys: `mailhost apikey add|list|del`, and the daemon's check of `Authorization: Bearer KEY`.

A key is `mh_` and 43 URL-safe characters (256 random bits), shown once when it is made.
Only its SHA-256 is stored: a random key of that strength needs no slow hash (a slow hash
protects guessable passwords), and a stolen file lets no one send. The file is
`state_dir/apikeys.json`, mode 0600, replaced atomically under an exclusive flock on
`apikeys.json.lock` (as the suppression list), and given to the owner of state_dir when
root runs the command. The daemon reads it again when it changes: a key added or deleted
counts from the next request, without a reload.

Scopes (`--scope`, repeatable): `send` may POST messages; `read` may read messages' states,
the queue, the suppression list and the events; `admin` may do both and change the
suppression list. A key may send only as its `--sender`s (addresses or @domain): in the
envelope and in every originator field (From:, Sender:, Resent-*). A key with none may not send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import Owner, owner_of
from mailhost.ops.statelock import exclusive
from mailhost.ops.watched import Identity, read_if_changed

FILE_NAME = "apikeys.json"
KEY_PREFIX = "mh_"
SCOPES = ("send", "read", "admin")
DEFAULT_RATE = 10.0  # requests per second, per key
BURST_SECONDS = 5.0  # a key may spend this many seconds' worth of requests at once
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_PATTERN = re.compile(r"mh_[A-Za-z0-9_-]{43}")


class ApiKeyError(Exception):
    """A mistake in a command or the key file: one line."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str  # SHA-256 of the key, hex
    scopes: tuple[str, ...] = ("send",)
    senders: tuple[str, ...] = ()  # addresses and @domains it may send as
    rate: float = DEFAULT_RATE  # requests per second
    created: str = ""  # ISO 8601, UTC

    def allows(self, scope: str) -> bool:
        """`admin` holds every scope; `send` and `read` are independent of each other."""
        return scope in self.scopes or "admin" in self.scopes

    @property
    def burst(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS)

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.digest, "scopes": list(self.scopes), "senders": list(self.senders), "rate": self.rate,
                "created": self.created}


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ApiKeyError(f"key name {name[:70]!r}: use 1 to 64 letters, digits, dots, hyphens and underscores, "
                          "starting with a letter or digit")
    return name


def parse_scopes(given: list[str] | None) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(given or ["send"]))
    for scope in scopes:
        if scope not in SCOPES:
            raise ApiKeyError(f"--scope {scope!r}: one of {', '.join(SCOPES)}")
    return scopes


def parse_sender(text: str) -> str:
    """An address or @domain, lower case; ApiKeyError naming it otherwise."""
    item = text.strip().lower().rstrip(".")
    local, _, domain = item.rpartition("@")
    if (item.count("@") != 1 or "." not in domain or not re.fullmatch(r"[a-z0-9.-]+", domain)
            or any(c in local for c in ' :<>,;"\\') or not item.isprintable() or len(item) > 254):
        raise ApiKeyError(f"--sender {text[:70]!r}: an address such as news@example.test or @example.test for a "
                          "whole domain")
    return item


class ApiKeys:
    """The key file of one state_dir (see the module docstring)."""

    def __init__(self, state_dir: Path, owner: Owner | None = None) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.owner = owner
        self._lock_path = self.path.with_name(FILE_NAME + ".lock")
        self._mutex = threading.Lock()
        self._identity: Identity | None = None
        self._keys: dict[str, ApiKey] = {}  # by name

    # --- reading ---------------------------------------------------------------------

    def keys(self) -> list[ApiKey]:
        with self._mutex:
            self._refresh()
            return sorted(self._keys.values(), key=lambda k: k.name)

    def find(self, key: str) -> ApiKey | None:
        """The entry of a presented key, or None (blocking: a stat, and a read when the file changed)."""
        if not _KEY_PATTERN.fullmatch(key):
            return None
        digest = digest_of(key)
        with self._mutex:
            self._refresh()
            entries = list(self._keys.values())
        found = None
        for entry in entries:  # every entry compared in constant time: no early exit to time
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    # --- changing ------------------------------------------------------------------

    def add(self, name: str, scopes: tuple[str, ...], senders: tuple[str, ...], rate: float = DEFAULT_RATE) -> str:
        """Make a key called `name`; returns the key itself (stored only as its hash)."""
        check_name(name)
        if not 0 < rate <= 100000:
            raise ApiKeyError(f"--rate {rate:g}: requests per second, more than 0 and at most 100000")
        key = new_key()
        created = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="seconds")
        with self._changing() as keys:
            if name in keys:
                raise ApiKeyError(f"a key called {name} exists (`mailhost apikey del {name}` first)")
            keys[name] = ApiKey(name, digest_of(key), scopes, senders, float(rate), created)
        return key

    def delete(self, name: str) -> None:
        with self._changing() as keys:
            if keys.pop(name, None) is None:
                raise ApiKeyError(f"no key called {name[:70]!r} (see `mailhost apikey list`)")

    # --- internals ---------------------------------------------------------------

    @contextmanager
    def _changing(self) -> Iterator[dict[str, ApiKey]]:
        """A read-modify-write under the flock, starting from the file as it is now; the
        body's changes to the dict it gets are written unless it raises."""
        with self._mutex, exclusive(self._lock_path, self.owner):
            self._refresh(force=True)
            entries = dict(self._keys)
            yield entries
            self._write(entries)
            self._keys, self._identity = entries, None

    def _refresh(self, force: bool = False) -> None:
        try:
            changed = read_if_changed(self.path, None if force else self._identity, 1 << 24)
        except FileNotFoundError:
            self._identity, self._keys = None, {}
            return
        except OSError as error:
            raise ApiKeyError(f"{self.path}: cannot read: {error.strerror}") from None
        if changed is None:
            return
        identity, data = changed
        self._keys = self._decode(data)
        self._identity = identity

    def _decode(self, data: bytes) -> dict[str, ApiKey]:
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise ApiKeyError(f"{self.path}: not valid JSON ({error}); fix or remove the file") from None
        if not isinstance(raw, dict) or raw.get("version") != 1 or not isinstance(raw.get("keys"), dict):
            raise ApiKeyError(f"{self.path}: not a mailhost API key file (version 1)")
        keys = {}
        for name, value in raw["keys"].items():
            try:
                scopes = tuple(value["scopes"])
                senders = tuple(value.get("senders", ()))
                entry = ApiKey(check_name(name), str(value["hash"]), scopes, senders, float(value.get("rate", DEFAULT_RATE)),
                               str(value.get("created", "")))
                if not re.fullmatch(r"[0-9a-f]{64}", entry.digest) or not set(scopes) <= set(SCOPES) or not all(
                        isinstance(s, str) for s in senders):
                    raise ValueError(name)
            except (KeyError, TypeError, ValueError, ApiKeyError):
                raise ApiKeyError(f"{self.path}: the entry of key {name[:70]!r} is not one mailhost wrote") from None
            keys[name] = entry
        return keys

    def _write(self, keys: dict[str, ApiKey]) -> None:
        data = {"version": 1, "keys": {name: keys[name].to_json() for name in sorted(keys)}}
        encoded = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
        write_file_atomically(self.path, encoded, 0o600, self.owner)


def api_keys(state_dir: Path) -> ApiKeys:
    """The daemon's and the CLI's shared key file."""
    return ApiKeys(Path(state_dir), owner_of(Path(state_dir)))
