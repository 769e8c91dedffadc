"""Bounce processing: VERP return paths, reading RFC 3464 reports, and the
suppression list.

Everything here is blocking (file I/O, parsing): the daemon calls it on its
disk thread pool, the command line calls it directly.

VERP (`verp_sender` / `verp_recipient`)
---------------------------------------

The envelope sender of a message to one recipient becomes
`bounces+<tail>@<bounce_domain>`, the whole local part a valid dot-atom of at
most 64 octets (RFC 5321 4.5.3.1.1). The first form that fits is used:

1. Readable, the classic VERP `local=domain`: when the recipient is
   `local@domain` with an ASCII dot-atom local part and a host-name domain.
   In the local part every character other than `A-Z a-z 0-9 . _ -` becomes
   `+` and two hex digits (`+` is `+2b`, `=` is `+3d`), so the only `=` is the
   one that stands for the `@`. `bob+news@example.com` ->
   `bounces+bob+2bnews=example.com@bounce.example`.
2. `=` and the recipient's UTF-8 in base32 (lowercase, no padding): any other
   recipient of at most 34 octets (quoted local parts, non-ASCII, literals,
   long readable forms).
3. `=0` and 26 base32 characters of the SHA-256 of the recipient's key (see
   below): a recipient too long for either. This form cannot be turned back on
   its own: `verp_recipient` returns the candidate (from the report's
   Final-Recipient/Original-Recipient) whose hash it is, else None. Keeping a
   table of hashes instead would put a write on the sending path for a case
   that needs a 57-character address; the report names the recipient anyway.

Base32 never contains `0`, `1`, `8`, `9` or `=`, and a readable tail never
starts with `=`, so the three forms cannot be confused. Base32 and the hex
escapes are read without regard to case, because some relays change the case
of a return path.

Address keys
------------

The suppression list compares addresses by a key: surrounding `<>` dropped,
the whole address lowercased (the local part too: RFC 5321 lets it be case
sensitive, but no provider's is, and missing a bounced address costs more
than matching one too many) and a trailing dot of the domain dropped.
Internationalised domains are compared as written (U-label and A-label forms
of the same domain are different keys).

The file
--------

One JSON file (`state_dir/suppression.json`), mode 0600, replaced atomically
with `durable.write_file_atomically` on every change. The daemon and the
command line both write it: a change is a read-modify-write under an
exclusive `flock` on `suppression.json.lock` next to it (and a thread lock
within a process), and every instance re-reads the file when its identity
(inode, size, mtime) changes, so each sees the other's changes on its next
call. A file that is not ours to read raises `SuppressionError` (never
overwritten: the list would be lost).
"""

from __future__ import annotations

import base64
import csv
import email.message
import email.parser
import hashlib
import json
import os
import re
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from mailhost.config import BounceRule
from mailhost.feedback.classify import HARD, classify_reply, suppression_effect
from mailhost.feedback.events import EventLog, event_log
from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import Owner, owner_of
from mailhost.ops.statelock import exclusive
from mailhost.ops.watched import Identity, identity_of, read_if_changed

__all__ = [
    "BounceReport",
    "SuppressionEntry",
    "SuppressionError",
    "SuppressionList",
    "address_key",
    "entry_problem",
    "parse_dsn",
    "verp_recipient",
    "verp_sender",
]

VERP_PREFIX = "bounces+"
LOCAL_PART_LIMIT = 64  # RFC 5321 4.5.3.1.1
ADDRESS_LIMIT = 320  # RFC 5321 4.5.3.1: 64 + 1 + 255
TEXT_LIMIT = 1000  # characters of a diagnostic / reason kept
MAX_REPORTS = 1000  # per-recipient blocks read from one report

_TAIL_LIMIT = LOCAL_PART_LIMIT - len(VERP_PREFIX)
_HASH_CHARS = 26  # 130 bits

_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_KEEP = re.compile(r"[A-Za-z0-9._-]")
_READABLE = re.compile(r"^([A-Za-z0-9._+-]+)=([A-Za-z0-9.-]+)$")
_ESCAPE = re.compile(r"\+([0-9A-Fa-f]{2})")
_BASE32 = re.compile(r"^[A-Za-z2-7]+$")

_STATUS = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}$")
_TYPED = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9-]*)\s*;\s*(.*)$", re.DOTALL)
_XTEXT_UTF8 = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_REPORT_TYPES = ("delivery-status", "global-delivery-status")
_STATUS_PARTS = ("message/delivery-status", "message/global-delivery-status")
_BOUNCE_ACTIONS = ("failed", "delayed")

# Unicode categories that must not reach a stored reason as they are.
_SPACE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Zs"})
_BAD_CATEGORIES = frozenset({"Cf", "Cs", "Co", "Cn"})


# ---------------------------------------------------------------------------
# Addresses


def address_key(address: str) -> str:
    """The form the suppression list compares (see the module docstring)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local}@{domain.rstrip('.')}".lower()


def _is_address(address: str) -> bool:
    """A plausible mailbox `local@domain`: both parts there, no control or
    invisible characters, spaces only inside a quoted local part."""
    if not address or len(address) > ADDRESS_LIMIT:
        return False
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain.rstrip("."):
        return False
    if any(unicodedata.category(ch) in _BAD_CATEGORIES or unicodedata.category(ch) == "Cc" for ch in address):
        return False
    if any(ch.isspace() for ch in domain):
        return False
    quoted = len(local) >= 2 and local[0] == local[-1] == '"'
    return quoted or not any(ch.isspace() for ch in local)


# ---------------------------------------------------------------------------
# VERP


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    if not _BASE32.match(text):
        return None
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        data = base64.b32decode(padded)
    except ValueError:
        return None
    # Only the one spelling we produce (no stray trailing bits): reversible both ways.
    return data if _b32(data) == text.lower() else None


def _recipient_hash(recipient: str) -> str:
    digest = hashlib.sha256(address_key(recipient).encode("utf-8", "surrogatepass")).digest()
    return _b32(digest)[:_HASH_CHARS]


def _readable(recipient: str) -> str | None:
    local, at, domain = recipient.rpartition("@")
    if not at or not _DOT_ATOM.match(local) or not _HOST.match(domain):
        return None
    escaped = "".join(ch if _KEEP.match(ch) else f"+{ord(ch):02x}" for ch in local)
    return f"{escaped}={domain}"


def verp_sender(bounce_domain: str, recipient: str) -> str:
    """The VERP envelope sender for a message to `recipient`:
    `bounces+<tail>@<bounce_domain>` (the tail's three forms are in the module
    docstring). Raises ValueError for an empty recipient, one with control
    characters, or a bounce domain that is not an ASCII host name (use the
    A-label of an IDN)."""
    domain = bounce_domain.strip().rstrip(".")
    if not _HOST.match(domain):
        raise ValueError(f"not a bounce domain (an ASCII host name): {bounce_domain!r}")
    if not recipient:
        raise ValueError("a VERP sender needs a recipient")
    if any(unicodedata.category(ch) == "Cc" for ch in recipient):
        raise ValueError(f"control character in recipient {recipient!r}")
    tail = _readable(recipient)
    if tail is None or len(tail) > _TAIL_LIMIT:
        encoded = "=" + _b32(recipient.encode("utf-8", "surrogatepass"))
        tail = encoded if len(encoded) <= _TAIL_LIMIT else "=0" + _recipient_hash(recipient)
    return f"{VERP_PREFIX}{tail}@{domain}"


def _from_readable(tail: str) -> str | None:
    match = _READABLE.match(tail)
    if match is None:
        return None
    escaped, domain = match.groups()
    if "+" in _ESCAPE.sub("", escaped):
        return None  # a "+" that is not an escape: not something we wrote
    local = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), escaped)
    if not _DOT_ATOM.match(local) or not _HOST.match(domain):
        return None
    return f"{local}@{domain}"


def _from_base32(text: str) -> str | None:
    data = _unb32(text)
    if not data:
        return None
    try:
        recipient = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(unicodedata.category(ch) == "Cc" for ch in recipient):
        return None
    return recipient


def verp_recipient(local_part: str, candidates: Iterable[str] = ()) -> str | None:
    """The recipient a VERP local part (`bounces+...`, the prefix compared
    without case) was made for, or None when it is not one of ours.

    A hashed tail (`=0...`) is matched against `candidates`, the addresses a
    report names (BounceReport.recipient and .original_recipient): the first
    whose hash it is comes back, as given."""
    if not isinstance(local_part, str) or len(local_part) > LOCAL_PART_LIMIT:
        return None
    if local_part[: len(VERP_PREFIX)].lower() != VERP_PREFIX:
        return None
    tail = local_part[len(VERP_PREFIX) :]
    if tail.startswith("=0"):
        wanted = tail[2:].lower()
        if len(wanted) != _HASH_CHARS:
            return None
        return next((c for c in candidates if c and _recipient_hash(c) == wanted), None)
    if tail.startswith("="):
        return _from_base32(tail[1:])
    return _from_readable(tail)


# ---------------------------------------------------------------------------
# Reading delivery status notifications


@dataclass(frozen=True)
class BounceReport:
    """One per-recipient block of a report whose Action is failed or delayed.

    `recipient` is the Final-Recipient address (Original-Recipient when the
    final one is missing or not a mail address); `status` the x.y.z code ("" when
    the report gave none we can read); `diagnostic` the Diagnostic-Code text
    without its type ("smtp; "), one cleaned line. `permanent` is Action failed
    with a 5.x.x status: a report without a readable status never counts as
    permanent."""

    recipient: str
    status: str
    action: str
    diagnostic: str
    permanent: bool
    original_recipient: str = ""
    category: str = ""  # the bounce class when the caller classified it already; "" to classify here


def _clean(text: str, limit: int = TEXT_LIMIT) -> str:
    """One line: controls and separators a space, invisible characters "?",
    runs of spaces collapsed, at most `limit` characters."""
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in _SPACE_CATEGORIES:
            out.append(" ")
        elif category in _BAD_CATEGORIES:
            out.append("?")
        else:
            out.append(ch)
    cleaned = re.sub(" +", " ", "".join(out)).strip(" ")
    return cleaned[: limit - 3].rstrip(" ") + "..." if len(cleaned) > limit else cleaned


def _raw_text(value: Any) -> str:
    """A raw header value as text: 8-bit bytes (kept by the parser as
    surrogate escapes) read as UTF-8, folding undone."""
    text = str(value)
    try:
        text = text.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        pass  # already real text
    return re.sub(r"\r?\n(?=[ \t])", "", text)


def _fields(block: email.message.Message) -> dict[str, str]:
    """The block's fields by lowercased name, the first of each kept."""
    fields: dict[str, str] = {}
    for name, value in block.raw_items():
        fields.setdefault(str(name).strip().lower(), _raw_text(value))
    return fields


def _typed_address(value: str | None) -> str | None:
    """The mail address of an RFC 3464 address field ("rfc822; a@b",
    "utf-8; xtext or UTF-8", a bare address), or None."""
    if not value:
        return None
    match = _TYPED.match(value)
    atype, address = (match.group(1).lower(), match.group(2)) if match else ("rfc822", value)
    if atype == "utf-8":
        try:
            address = _XTEXT_UTF8.sub(lambda m: chr(int(m.group(1), 16)), address)
        except (ValueError, OverflowError):
            return None
    elif atype != "rfc822":
        return None
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address if _is_address(address) else None


def _status_code(value: str | None) -> str:
    """The x.y.z code that starts a Status field (comments after it allowed)."""
    words = (value or "").split()
    return words[0] if words and _STATUS.match(words[0]) else ""


def _diagnostic(value: str | None) -> str:
    if not value:
        return ""
    match = _TYPED.match(value)
    return _clean(match.group(2) if match else value)


def _report(block: email.message.Message) -> BounceReport | None:
    fields = _fields(block)
    words = fields.get("action", "").split()
    action = words[0].lower() if words else ""
    if action not in _BOUNCE_ACTIONS:
        return None
    final = _typed_address(fields.get("final-recipient"))
    original = _typed_address(fields.get("original-recipient"))
    recipient = final or original
    if recipient is None:
        return None
    status = _status_code(fields.get("status"))
    return BounceReport(
        recipient=recipient,
        status=status,
        action=action,
        diagnostic=_diagnostic(fields.get("diagnostic-code")),
        permanent=action == "failed" and status.startswith("5"),
        original_recipient=original or "",
    )


def _headers_only(data: bytes) -> email.message.Message:
    """Headers parsed, body kept as it is: `email` would otherwise parse a
    message/* part as a message (a global-delivery-status part, or an encoded
    delivery-status part, would come out as nonsense)."""
    return email.parser.BytesParser().parsebytes(data, headersonly=True)


def _body_bytes(message: email.message.Message) -> bytes:
    # decode=True gives the 8-bit bytes back as they came (without it, `email` guesses a charset).
    data = message.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _parts(body: bytes, boundary: str) -> Iterator[bytes]:
    """The parts of a multipart body (RFC 2046 5.1.1): what lies between
    delimiter lines, preamble and epilogue dropped, one level deep. A part
    that no delimiter ends is dropped: in a truncated report it may end in
    the middle of an address, and a cut address may be someone else's."""
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    current: list[bytes] | None = None
    for line in body.splitlines(keepends=True):
        if line.startswith(delimiter):
            rest = line[len(delimiter) :].rstrip(b" \t\r\n")
            if rest in (b"", b"--"):
                if current is not None:
                    yield b"".join(current)
                if rest == b"--":
                    return
                current = []
                continue
        if current is not None:
            current.append(line)


def _status_blocks(part: email.message.Message) -> Iterator[email.message.Message]:
    """The field blocks of a delivery-status part, its transfer encoding undone."""
    data = _body_bytes(part)
    parser = email.parser.BytesHeaderParser()
    for chunk in re.split(rb"\n[ \t]*\n", data.replace(b"\r\n", b"\n")):
        if chunk.strip():
            yield parser.parsebytes(chunk.strip(b"\n") + b"\n")


def _is_report(message: email.message.Message) -> bool:
    if message.get_content_type() != "multipart/report":
        return False
    report_type = message.get_param("report-type")
    # No report-type at all is tolerated (some gateways drop it); another type is not a DSN.
    return report_type is None or (isinstance(report_type, str) and report_type.strip().lower() in _REPORT_TYPES)


def _reports(data: bytes) -> Iterator[BounceReport]:
    top = _headers_only(data)
    boundary = top.get_boundary()
    if not _is_report(top) or not isinstance(boundary, str) or not boundary:
        return
    for raw_part in _parts(_body_bytes(top), boundary):
        part = _headers_only(raw_part)
        if part.get_content_type() not in _STATUS_PARTS:
            continue
        for block in _status_blocks(part):
            report = _report(block)
            if report is not None:
                yield report


def parse_dsn(message: bytes) -> list[BounceReport]:
    """The failed and delayed recipients of an RFC 3464 report (multipart/report;
    report-type=delivery-status, or RFC 6533's global-delivery-status), one
    report per recipient (the first block for an address wins). Anything else,
    however malformed, gives []: this reads mail from anyone."""
    try:
        found: list[BounceReport] = []
        seen: set[str] = set()
        for report in _reports(bytes(message)):
            key = address_key(report.recipient)
            if key not in seen:
                seen.add(key)
                found.append(report)
            if len(found) >= MAX_REPORTS:
                break
        return found
    except Exception:  # noqa: BLE001 - hostile input must not take the caller down
        return []


# ---------------------------------------------------------------------------
# The suppression list


class SuppressionError(Exception):
    """The suppression file cannot be used (unreadable, not our format)."""


SOURCES = ("bounce", "complaint", "unsubscribe", "manual")


@dataclass(frozen=True)
class SuppressionEntry:
    address: str  # the address key
    status: str  # x.y.z, or "" when none was given
    reason: str  # the reply or report text that caused it, or the operator's words
    date: str  # ISO 8601, UTC, when it was suppressed
    source: str  # one of SOURCES
    category: str = ""  # the bounce class (feedback.classify), "complaint", "unsubscribe", "" for manual
    scope: str = ""  # a sender domain: suppressed for mail from that domain only; "" for every sender


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


class SuppressionList:
    """The addresses not to send to, kept in one JSON file (see the module
    docstring for how two processes share it)."""

    def __init__(self, path: Path, soft_limit: int = 3, soft_window: float = 7 * 86400,
                 owner: Owner | None = None, events: EventLog | None = None,
                 rules: tuple[BounceRule, ...] = ()) -> None:
        if soft_limit < 1:
            raise ValueError(f"soft_limit must be at least 1, not {soft_limit}")
        if soft_window <= 0:
            raise ValueError(f"soft_window must be positive, not {soft_window}")
        self.path = Path(path)
        self.soft_limit = soft_limit
        self.soft_window = float(soft_window)
        self.owner = owner  # the CLI run as root: the files go to the daemon's user
        self.events = events  # where each new entry is told as a "suppressed" event
        self.rules = rules  # [[bounce_rule]]s, first in classify_reply (replaced on SIGHUP)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.RLock()
        self._identity: Identity | None = None
        self._suppressed: dict[str, SuppressionEntry] = {}
        self._scoped: dict[str, dict[str, SuppressionEntry]] = {}  # sender domain -> address key -> entry
        self._soft: dict[str, list[float]] = {}

    # -- queries

    def is_suppressed(self, address: str, sender: str | None = None) -> SuppressionEntry | None:
        """The entry that stops mail to `address`: one for every sender, else (given the
        envelope sender, an address or a domain) one scoped to the sender's domain."""
        with self._mutex:
            self._refresh()
            key = address_key(address)
            entry = self._suppressed.get(key)
            if entry is None and sender and self._scoped:
                scoped = self._scoped.get(scope_key(sender))
                entry = scoped.get(key) if scoped else None
            return entry

    def entries(self) -> list[SuppressionEntry]:
        """Every entry, those for every sender and the scoped ones, by address."""
        with self._mutex:
            self._refresh()
            scoped = [e for entries in self._scoped.values() for e in entries.values()]
            return sorted([*self._suppressed.values(), *scoped], key=lambda e: (e.address, e.scope))

    def soft_count(self, address: str, now: float | None = None) -> int:
        """Soft bounces of `address` still inside the window."""
        now = time.time() if now is None else now
        with self._mutex:
            self._refresh()
            return len(self._recent(self._soft.get(address_key(address), []), now))

    # -- changes

    def add(self, address: str, status: str, reason: str, source: str = "manual",
            *, category: str = "", scope: str = "", now: float | None = None) -> None:
        """Suppress `address` (replacing an entry it has), for every sender or, with `scope`,
        for mail from that sender domain only. Raises ValueError for something that is not a
        mail address, an x.y.z status, a known source or a domain."""
        address = address.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1].strip()
        if not _is_address(address):
            raise ValueError(f"not a mail address: {address!r}")
        status = status.strip()
        if status and not _STATUS.match(status):
            raise ValueError(f"not a status code (x.y.z with x 2, 4 or 5): {status!r}")
        if source not in SOURCES:
            raise ValueError(f"not a suppression source ({', '.join(SOURCES)}): {source!r}")
        scope = scope_key(scope) if scope else ""
        if scope and not _HOST.match(scope):
            raise ValueError(f"not a sender domain: {scope!r}")
        now = time.time() if now is None else now
        with self._changing(now):
            entry = self._put(address_key(address), status, reason, source, now, category, scope)
        self._tell(entry, now)

    def add_entries(self, entries: list[SuppressionEntry]) -> int:
        """Add entries as they are (an import: the dates and classes of another tool's list),
        replacing the ones they match, in one write; no events are told (the list comes from
        the tool that would hear them). Check each with `entry_problem` first."""
        now = time.time()
        with self._changing(now):
            for e in entries:
                key = address_key(e.address)
                entry = SuppressionEntry(key, e.status, _clean(e.reason), e.date or _iso(now), e.source,
                                         _clean(e.category, 40), scope_key(e.scope) if e.scope else "")
                if entry.scope:
                    self._scoped.setdefault(entry.scope, {})[key] = entry
                else:
                    self._soft.pop(key, None)
                    self._suppressed[key] = entry
        return len(entries)

    def remove(self, address: str, scope: str | None = None) -> bool:
        """Take `address` off the list (and forget its soft bounces): its entry for every
        sender and every scoped one, or with `scope` ("" for the unscoped entry) just that
        one; False when there was none."""
        key = address_key(address)
        with self._changing(time.time()):
            removed = False
            if scope is None or scope == "":
                self._soft.pop(key, None)
                removed = self._suppressed.pop(key, None) is not None
            for domain in list(self._scoped) if scope is None else ([scope_key(scope)] if scope else []):
                entries = self._scoped.get(domain, {})
                removed = entries.pop(key, None) is not None or removed
                if not entries:
                    self._scoped.pop(domain, None)
            return removed

    def classify(self, report: BounceReport) -> str:
        """The report's bounce class: the one it carries, else the classifier's verdict."""
        return report.category or classify_reply(report.status, report.diagnostic, rules=self.rules)

    def record_bounce(self, report: BounceReport, now: float | None = None) -> bool:
        """Count one bounce, as its class says (feedback.classify): an invalid recipient
        suppresses at once when the failure is permanent; a full or inactive mailbox (and a
        temporary "user unknown") suppresses when `soft_limit` of them fall within
        `soft_window` seconds; every other class (a policy, authentication or content
        block, a rate limit, ...) counts for nothing. The entry keeps the class and the
        reply. True when the address is now suppressed (also when it already was)."""
        now = time.time() if now is None else now
        key = address_key(report.recipient)
        category = self.classify(report)
        effect = suppression_effect(category, report.permanent)
        if not _is_address(key) or report.action not in _BOUNCE_ACTIONS or effect is None:
            return self.is_suppressed(key) is not None
        with self._changing(now) as changed:
            if key in self._suppressed:
                changed.append(False)  # nothing to write
                return True
            if effect == HARD:
                added = self._put(key, report.status, report.diagnostic or f"{report.action} {report.status}", "bounce",
                                  now, category)
            else:
                recent = self._recent(self._soft.get(key, []), now) + [now]
                if len(recent) < self.soft_limit:
                    self._soft[key] = recent
                    return False
                days = self.soft_window / 86400
                reason = f"{len(recent)} soft bounces in {days:g} days"
                if report.diagnostic:
                    reason += f"; last: {report.diagnostic}"
                added = self._put(key, report.status, reason, "bounce", now, category)
        self._tell(added, now)
        return True

    def _tell(self, entry: SuppressionEntry, now: float) -> None:
        """A new entry is an event for the campaign tools (after the list itself is written)."""
        if self.events is not None:
            self.events.record("suppressed", recipient=entry.address, status=entry.status, reason=entry.reason,
                               source=entry.source, scope=entry.scope, now=now, **{"class": entry.category})

    # -- internals

    def _recent(self, times: list[float], now: float) -> list[float]:
        # Times after `now` stay: another thread may have recorded one while this change
        # (its `now` taken earlier) waited for the lock, and the write must not drop it.
        return [t for t in times if now - self.soft_window < t]

    def _put(self, key: str, status: str, reason: str, source: str, now: float, category: str = "",
             scope: str = "") -> SuppressionEntry:
        entry = SuppressionEntry(key, status, _clean(reason), _iso(now), _clean(source, 40), _clean(category, 40),
                                 scope)
        if scope:
            self._scoped.setdefault(scope, {})[key] = entry
        else:
            self._soft.pop(key, None)
            self._suppressed[key] = entry
        return entry

    @contextmanager
    def _changing(self, now: float) -> Iterator[list[bool]]:
        """Read-modify-write under both locks, starting from the file as it is
        now. The body may append False to the yielded list to skip the write;
        soft bounces older than the window before `now` are dropped."""
        with self._mutex, exclusive(self._lock_path, self.owner):
            # A change always starts from the file itself: another process's replacement can
            # reuse the inode, size and mtime tick of the one loaded last (seen with workers
            # recording soft bounces at once), and a change on a stale copy would lose theirs.
            self._identity = None
            self._refresh()
            changed: list[bool] = []
            yield changed
            if changed != [False]:
                self._write(now)

    def _refresh(self) -> None:
        """Load the file when it is not the one loaded last."""
        try:
            changed = read_if_changed(self.path, self._identity)
        except FileNotFoundError:
            if self._identity is not None:
                self._identity = None
                self._suppressed, self._scoped, self._soft = {}, {}, {}
            return
        except OSError as error:
            raise SuppressionError(f"{self.path}: cannot read: {error.strerror}") from None
        if changed is None:
            return
        identity, data = changed
        self._suppressed, self._scoped, self._soft = self._decode(data)
        self._identity = identity

    def _decode(self, data: bytes) -> tuple[dict[str, SuppressionEntry], dict[str, dict[str, SuppressionEntry]],
                                            dict[str, list[float]]]:
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise SuppressionError(f"{self.path}: not valid JSON ({error}); fix or remove the file") from None
        if not isinstance(raw, dict) or raw.get("version") != 1:
            raise SuppressionError(f"{self.path}: not a mailhost suppression list (version 1)")
        suppressed_raw, soft_raw = raw.get("suppressed", {}), raw.get("soft", {})
        scoped_raw = raw.get("scoped", {})
        if not all(isinstance(part, dict) for part in (suppressed_raw, soft_raw, scoped_raw)):
            raise SuppressionError(f"{self.path}: \"suppressed\", \"scoped\" and \"soft\" must be objects")
        suppressed = self._decode_entries(suppressed_raw, "")
        scoped: dict[str, dict[str, SuppressionEntry]] = {}
        for domain, entries in scoped_raw.items():
            if not isinstance(entries, dict):
                raise SuppressionError(f"{self.path}: scoped entries of {domain!r} are not an object")
            scoped[domain] = self._decode_entries(entries, domain)
        soft: dict[str, list[float]] = {}
        for key, value in soft_raw.items():
            if not isinstance(value, list) or not all(isinstance(t, (int, float)) for t in value):
                raise SuppressionError(f"{self.path}: soft bounces of {key!r} are not a list of times")
            soft[key] = [float(t) for t in value]
        return suppressed, scoped, soft

    def _decode_entries(self, raw: dict[str, Any], scope: str) -> dict[str, SuppressionEntry]:
        entries: dict[str, SuppressionEntry] = {}
        for key, value in raw.items():
            if not isinstance(value, dict) or not all(isinstance(value.get(f, ""), str) for f in _STORED_FIELDS):
                raise SuppressionError(f"{self.path}: entry {key!r} is not an object of strings")
            entries[key] = SuppressionEntry(key, value.get("status", ""), value.get("reason", ""),
                                            value.get("date", ""), value.get("source", ""),
                                            value.get("class", ""), scope)
        return entries

    def _write(self, now: float) -> None:
        # Old soft bounces of every address go on each write, so the file does not grow forever.
        soft = {k: r for k, times in self._soft.items() if (r := self._recent(times, now))}
        self._soft = soft
        data = {
            "version": 1,
            "suppressed": _stored(self._suppressed),
            "scoped": {domain: _stored(entries) for domain, entries in sorted(self._scoped.items()) if entries},
            "soft": dict(sorted(soft.items())),
        }
        encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        write_file_atomically(self.path, encoded + b"\n", 0o600, self.owner)
        # Still under the flock: no one else has written since, so what we hold is this file.
        self._identity = identity_of(os.stat(self.path))


_STORED_FIELDS = ("status", "reason", "date", "source", "class")


def _stored(entries: dict[str, SuppressionEntry]) -> dict[str, dict[str, str]]:
    return {key: {"status": e.status, "reason": e.reason, "date": e.date, "source": e.source, "class": e.category}
            for key, e in sorted(entries.items())}


def entry_problem(address: str, status: str, source: str, scope: str) -> str | None:
    """Why these fields cannot make a suppression entry (the checks `add` makes), or None."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not _is_address(address):
        return f"not a mail address: {address!r}"
    if status and not _STATUS.match(status):
        return f"not a status code (x.y.z with x 2, 4 or 5): {status!r}"
    if source not in SOURCES:
        return f"not a suppression source ({', '.join(SOURCES)}): {source!r}"
    if scope and not _HOST.match(scope_key(scope)):
        return f"not a sender domain: {scope!r}"
    return None


def scope_key(sender: str) -> str:
    """The sender domain a scoped entry is kept under: the domain of an address (or the
    domain itself), lowercased, without a trailing dot."""
    return sender.rpartition("@")[2].strip().rstrip(".").lower()


def suppression_list(state_dir: Path) -> SuppressionList:
    """The daemon's and the CLI's shared list: state_dir/suppression.json."""
    return SuppressionList(state_dir / "suppression.json", owner=owner_of(state_dir), events=event_log(state_dir))


# The list as CSV: `mailhost suppress export` and the web console's export write the same file,
# which `mailhost suppress import` reads back.
CSV_COLUMNS = ("address", "class", "reason", "source", "since", "scope", "status")


def write_csv(entries: list[SuppressionEntry], stream: IO[str]) -> None:
    """The entries as CSV with a header row (CSV_COLUMNS)."""
    out = csv.writer(stream, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    for e in entries:
        out.writerow([e.address, e.category, e.reason, e.source, e.date, e.scope, e.status])
