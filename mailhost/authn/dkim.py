"""DKIM signing (RFC 6376, RFC 8463), and key generation.

Keys live in state_dir/dkim/<domain>/<selector>.key (mode 0600), made by
`mailhost dkim keygen`; the newest key of a domain signs, unless a [[dkim]]
entry in the config names the selector and key file. Signatures are
relaxed/relaxed over the headers receivers look at, with From over-signed
(listed once more than it occurs, so no second From can be added) and both
List-Unsubscribe headers of RFC 8058 included.

The signing is our own, not dkimpy's: dkimpy split the whole message into lines,
canonicalised the body with a regex substitution per space and parsed the PEM key
in Python for every message (~60% of signing a 4 KiB newsletter, ~90% of 100 KiB).
Here the body is canonicalised with a few bytes operations done in C, the key is
loaded once, and the header is byte for byte the one dkimpy makes (same tags, order
and folding; tests/authn/test_dkim.py compares them). dkimpy stays the verifier.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections import Counter
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from twisted.logger import Logger

from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import make_dirs, owner_of

log = Logger(namespace="mailhost.dkim")

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
ALGORITHMS = (RSA, ED25519)
KEYS_CHECK_SECONDS = 1.0  # how soon a key from `mailhost dkim keygen` is used by a running daemon

SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "list-unsubscribe", "list-unsubscribe-post", "list-id", "sender", "feedback-id",
)
# Fields a message has at most once (RFC 5322 3.6, RFC 2045, RFC 8058): each is signed once more
# than it occurs, absent ones too (RFC 6376 5.4.2, 8.15), so a copy of a delivered message with
# a second Subject: or a List-Unsubscribe: of an attacker's prepended no longer verifies (as
# OpenDKIM's OversignHeaders and rspamd do). Only references and in-reply-to may legitimately be
# added by nobody either, but they are not "once" by the RFC's table, so they are signed as found.
OVERSIGNED = frozenset(SIGNED_HEADERS) - {"references", "in-reply-to"}

class DkimKeyError(Exception):
    """A key file that cannot be read or used; the text says which and why."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str
    private: bytes  # PEM (RSA) or the base64 seed (ed25519), as in the key file


def keys_folder(state_dir: Path) -> Path:
    return state_dir / "dkim"


def generate(state_dir: Path, domain: str, selector: str, algorithm: str = RSA) -> tuple[Path, str]:
    """Make a key pair, store the private key (0600); returns its path and the TXT record value to publish."""
    folder = keys_folder(state_dir) / domain.lower()
    owner = owner_of(state_dir)  # the daemon's user signs with it
    make_dirs(folder, 0o700, owner)
    path = folder / f"{selector}.key"
    if path.exists():
        raise DkimKeyError(f"{path} exists already; pick another selector (rotate by publishing a new one)")
    if algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        made = DkimKey(domain, selector, RSA, private)
    elif algorithm == ED25519:
        key_ed = ed25519.Ed25519PrivateKey.generate()
        seed = key_ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        private = b"ed25519\n" + base64.b64encode(seed) + b"\n"
        made = DkimKey(domain, selector, ED25519, base64.b64encode(seed))
    else:
        raise DkimKeyError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    write_file_atomically(path, private, mode=0o600, owner=owner)
    return path, public_record(made)


def public_record(key: DkimKey) -> str:
    """The TXT record value that publishes `key`'s public half (RFC 6376 3.6.1, RFC 8463 4)."""
    private = _private_key(key.algorithm, key.private)
    if isinstance(private, rsa.RSAPrivateKey):
        public = private.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def domain_keys(state_dir: Path, entries: Any, domain: str) -> list[DkimKey | DkimKeyError]:
    """Every key of `domain` present: its [[dkim]] entry (`entries`) and the keys made by
    keygen in state_dir/dkim/<domain>/, oldest first (each one, for publishing: a key being
    rotated in or out is published beside the one that signs)."""
    found: list[DkimKey | DkimKeyError] = []
    for entry in entries:
        if entry.domain == domain:
            try:
                found.append(load_key(entry.key_file, entry.domain, entry.selector))
            except DkimKeyError as e:
                found.append(e)
    folder = keys_folder(state_dir) / domain
    if folder.is_dir():
        for path in sorted(folder.glob("*.key"), key=lambda p: p.stat().st_mtime):
            try:
                found.append(load_key(path, domain, path.stem))
            except DkimKeyError as e:
                found.append(e)
    return found


def configured_keys(entries: Any) -> dict[str, DkimKey]:
    """[[dkim]] config entries (config.DkimConfig) as keys by domain."""
    keys = {}
    for entry in entries:
        key = load_key(entry.key_file, entry.domain, entry.selector)
        if key.algorithm != entry.algorithm:
            raise DkimKeyError(f"{entry.key_file}: a {key.algorithm} key, but [[dkim]] says {entry.algorithm}")
        keys[entry.domain] = key
    return keys


def load_key(path: Path, domain: str, selector: str) -> DkimKey:
    """The key in `path`, tried once: a key that cannot sign is refused here, naming
    the file and why, not found out by the first message after DATA."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DkimKeyError(f"{path}: cannot read DKIM key: {e.strerror}") from None
    if data.startswith(b"ed25519\n"):
        key = DkimKey(domain, selector, ED25519, data.split(b"\n")[1].strip())
    elif b"PRIVATE KEY" in data:
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise DkimKeyError(f"{path}: not a usable PEM private key ({e})") from None
        if not isinstance(loaded, rsa.RSAPrivateKey):
            kind = type(loaded).__name__.removeprefix("_").replace("PrivateKey", "") or "non-RSA"
            raise DkimKeyError(f"{path}: an {kind} key; DKIM signs with RSA (PEM) or ed25519 keys "
                               "(`mailhost dkim keygen` makes either)")
        key = DkimKey(domain, selector, RSA, data)
    else:
        raise DkimKeyError(f"{path}: not a PEM RSA key or an ed25519 key made by `mailhost dkim keygen`")
    try:
        sign(_PROBE, key)
    except Exception as e:  # cryptography says why in its own words
        raise DkimKeyError(f"{path}: cannot sign with this key: {e}") from None
    return key


_PROBE = b"From: probe@example.invalid\nSubject: key check\n\nbody\n"


def discover(state_dir: Path) -> dict[str, DkimKey | DkimKeyError]:
    """The newest key per domain in state_dir/dkim/ (blocking); a domain whose newest key
    cannot be used maps to the error, so its mail waits (451) until the key is fixed."""
    found: dict[str, DkimKey | DkimKeyError] = {}
    folder = keys_folder(state_dir)
    if not folder.is_dir():
        return found
    for domain_dir in sorted(folder.iterdir()):
        keys = sorted(domain_dir.glob("*.key"), key=lambda p: p.stat().st_mtime)
        if keys:
            try:
                found[domain_dir.name] = load_key(keys[-1], domain_dir.name, keys[-1].stem)
            except DkimKeyError as e:
                found[domain_dir.name] = e
    return found


def sign(message: bytes, key: DkimKey, now: int | None = None) -> bytes:
    """The DKIM-Signature header line(s) for `message` (LF line endings), ending in LF; b""
    (the message goes unsigned, with a warning) when its header section cannot be read.
    What is signed is the message as smtp.wire sends it (see _as_sent).
    `now` is the t= timestamp (default: the current time)."""
    head, body = _split(_as_sent(message))
    try:
        fields = _header_fields(head)
    except _Unreadable as e:
        # The obsolete syntax ("Received : x", RFC 5322 4.5) or a non-ASCII field name, which
        # verifiers read differently; the message is valid enough to send (the intake took it),
        # so it goes unsigned.
        log.warn("not DKIM-signed for {domain}: {error}", domain=key.domain, error=str(e)[:200])
        return b""
    names = _signed_names(fields)
    tags = [
        (b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
        (b"d", key.domain.encode()), (b"i", b"@" + key.domain.encode()), (b"q", b"dns/txt"),
        (b"s", key.selector.encode()), (b"t", str(int(time.time()) if now is None else now).encode()),
        (b"h", b" : ".join(names)),
        (b"bh", base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())),
    ]
    signature = _sign_digest(key, hashlib.sha256(_signed_header_data(fields, names, tags)).digest())
    return b"DKIM-Signature: " + _fold(_tag_list(tags + [(b"b", base64.b64encode(signature))]) + b"\n", b"\n")


def _as_sent(message: bytes) -> bytes:
    """The lines receivers verify, LF-terminated: smtp.wire.stuff_from_lf sends CRLF, a bare CR
    and a bare LF each as a line end, and ends the last line (RFC 5321 2.3.8, 4.1.1.4)."""
    if b"\r" in message:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return message if not message or message.endswith(b"\n") else message + b"\n"


class _Unreadable(ValueError):
    """A header section the signer does not read."""


def _split(message: bytes) -> tuple[bytes, bytes]:
    """(header lines, body) of an LF-only message: the header section ends at the first
    empty line (RFC 5322 2.1); the body is what follows that line."""
    if message.startswith(b"\n"):
        return b"", message[1:]
    end = message.find(b"\n\n")
    if end < 0:
        return message.removesuffix(b"\n"), b""
    return message[:end], message[end + 2:]


_FIELD_NAME = re.compile(rb"[\x21-\x7e]+?:")  # printable US-ASCII up to the first colon (RFC 5322 2.2)


def _header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value with its folds removed) per field, top to bottom (RFC 6376 3.4.2:
    a continuation line starts with WSP). An mbox "From " line is skipped, as dkimpy does."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n") if head else ():
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise _Unreadable(f"a continuation line before any field: {line[:60]!r}")
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        match = _FIELD_NAME.match(line)
        if match:
            fields.append((match.group()[:-1].lower(), line[match.end():]))
        elif not line.startswith(b"From "):
            raise _Unreadable(f"not a header field: {line[:60]!r}")
    return fields


def _signed_names(fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list: each of SIGNED_HEADERS as often as it occurs, once more if OVERSIGNED."""
    counts = Counter(name for name, _ in fields)
    names = []
    for name in SIGNED_HEADERS:
        raw = name.encode()
        names += [raw] * (counts[raw] + (1 if name in OVERSIGNED else 0))
    return names


def _selected(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The fields h= names, in h= order; a name listed n times takes the n-th field of that
    name counted from the bottom, or nothing when there are fewer (RFC 6376 5.4.2)."""
    below: dict[bytes, int] = {}
    chosen = []
    for name in names:
        i = below.get(name, len(fields))
        while i > 0:
            i -= 1
            if fields[i][0] == name:
                chosen.append(fields[i])
                break
        below[name] = i
    return chosen


_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_TO_SQUEEZE = re.compile(rb"\t[ \t]*| [ \t]+")  # a single space is already what 3.4.4 wants


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value with WSP runs as one SP, no WSP around
    the value or the colon. (bytes.strip, as dkimpy: it also drops a stray CR, VT or FF.)"""
    return name + b":" + _WSP_RUN.sub(b" ", value).strip()


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 on a body of LF-terminated lines, returned with CRLF line ends."""
    if b"\t" in body or b"  " in body:
        body = _WSP_TO_SQUEEZE.sub(b" ", body)  # (b) WSP runs within a line become one SP
    if b" \n" in body:
        body = body.replace(b" \n", b"\n")  # (a) no WSP at line ends (runs are single SPs by now)
    body = body.rstrip(b"\n")  # (c) no empty lines at the end; an empty body hashes as nothing
    return body.replace(b"\n", b"\r\n") + b"\r\n" if body else b""


def _tag_list(tags: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(name + b"=" + value for name, value in tags)


def _signed_header_data(fields: list[tuple[bytes, bytes]], names: list[bytes],
                        tags: list[tuple[bytes, bytes]]) -> bytes:
    """What the signature covers (RFC 6376 3.7): the selected fields canonicalised, each with
    CRLF, then this DKIM-Signature field with an empty b= and no CRLF (3.5, 3.7 step 2). The
    field is folded as it is sent, with a stand-in b= value that keeps the folds before b= as they
    will be, and relaxed canonicalisation takes the folds out again."""
    folded = _fold(_tag_list(tags + [(b"b", _B_PLACEHOLDER)]), b"\r\n")
    unsigned = folded.removesuffix(_B_PLACEHOLDER).replace(b"\r\n", b"")
    lines = [_relaxed_header(name, value) + b"\r\n" for name, value in _selected(fields, names)]
    return b"".join(lines) + _relaxed_header(b"dkim-signature", unsigned)


_B_PLACEHOLDER = b"0" * 60  # dkimpy's, so the folds (and the header) come out as dkimpy's


def _fold(value: bytes, linesep: bytes) -> bytes:
    """The DKIM-Signature value folded as dkimpy folds it: lines of at most 72 characters with
    the field name on the first, broken at the last space that fits; a word longer than a line
    is broken inside only in b= (RFC 6376 3.5 allows FWS there), elsewhere at the next space
    (dkimpy broke d= and i= of a domain over 68 characters: even dkimpy then refused them)."""
    width = 72 - len(b"DKIM-Signature")
    if len(value) <= width:
        return value
    lines = []
    while len(value) > width:
        space = value.rfind(b" ", 0, width)
        if space < 0:
            space = value.find(b" ", width)  # none left: this is b=, which is last
        if space < 0:
            lines.append(value[:width])
            value = value[width:]
        else:
            lines.append(value[:space])
            value = value[space + 1:]
        width = 71
    lines.append(value)
    return (linesep + b" ").join(lines)


def _sign_digest(key: DkimKey, digest: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 over the SHA-256 digest (RFC 6376 3.3.1), or Ed25519 over the digest
    itself (RFC 8463 3), through OpenSSL."""
    private = _private_key(key.algorithm, key.private)
    if isinstance(private, rsa.RSAPrivateKey):
        return private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return private.sign(digest)


@functools.lru_cache(maxsize=256)
def _private_key(algorithm: str, private: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """The key object, loaded once per key (parsing a PEM costs more than a 4 KiB body)."""
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(private, validate=True))
    loaded = serialization.load_pem_private_key(private, password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise DkimKeyError("not an RSA key")
    return loaded


class Signer:
    """Which key signs mail from which domain: [[dkim]] config entries, then keys made by keygen."""

    def __init__(self, state_dir: Path, configured: dict[str, DkimKey] | None = None) -> None:
        self.state_dir = state_dir
        self._configured = configured or {}
        self._stamp: float | None = None
        self._next_check = 0.0
        self.keys: dict[str, DkimKey | DkimKeyError] = {}
        self.reload()

    def reload(self) -> None:
        """Read the keys again (SIGHUP, or a new `mailhost dkim keygen`)."""
        self.keys = {**discover(self.state_dir), **self._configured}
        self._stamp = _folder_stamp(self.state_dir)

    def has_keys(self) -> bool:
        """Whether any domain signs; keygen adds a folder or file: noticed without a restart,
        within KEYS_CHECK_SECONDS (not a stat of the folder for every message)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + KEYS_CHECK_SECONDS
            if _folder_stamp(self.state_dir) != self._stamp:
                self.reload()
        return bool(self.keys)

    def key_for(self, domain: str | None) -> DkimKey | None:
        """The key that signs `domain`'s mail; raises DkimKeyError when that key is unusable."""
        key = self.keys.get(domain) if domain and self.has_keys() else None
        if isinstance(key, DkimKeyError):
            raise key
        return key


def _folder_stamp(state_dir: Path) -> float | None:
    folder = keys_folder(state_dir)
    try:
        return max([folder.stat().st_mtime] + [d.stat().st_mtime for d in folder.iterdir() if d.is_dir()])
    except FileNotFoundError:
        return None



