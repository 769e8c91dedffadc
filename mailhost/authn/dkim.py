"""DKIM signing (RFC 6376, RFC 8463) with dkimpy, and key generation.

Keys live in state_dir/dkim/<domain>/<selector>.key (mode 0600), made by
`mailhost dkim keygen`; the newest key of a domain signs, unless a [[dkim]]
entry in the config names the selector and key file. Signatures are
relaxed/relaxed over the headers receivers look at, with From over-signed
(listed once more than it occurs, so no second From can be added) and both
List-Unsubscribe headers of RFC 8058 included.
"""

from __future__ import annotations

import base64
from collections import Counter
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from twisted.logger import Logger

from mailhost.message import parse_header_section
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


def _openssl_rsa_sign(digest: Any, private_key: dict) -> bytes:
    """RSASSA-PKCS1-v1_5 through OpenSSL for dkimpy.

    dkimpy signs RSA in pure Python (pow() on 2048-bit numbers): ~10 ms of
    CPU with the GIL held per message, which cut intake by 80% with signing
    on. The same signature through `cryptography` takes under 1 ms; dkimpy
    still does the canonicalisation, hashing and header.
    """
    modulus = private_key["modulus"]
    key = _rsa_keys.get(modulus)
    if key is None:
        public = rsa.RSAPublicNumbers(private_key["publicExponent"], modulus)
        key = rsa.RSAPrivateNumbers(
            private_key["prime1"], private_key["prime2"], private_key["privateExponent"],
            private_key["exponent1"], private_key["exponent2"], private_key["coefficient"], public,
        ).private_key()
        _rsa_keys[modulus] = key
    value = digest.digest()
    algorithm = hashes.SHA256() if len(value) == 32 else hashes.SHA1()
    return key.sign(value, padding.PKCS1v15(), Prehashed(algorithm))


_rsa_keys: dict[int, Any] = {}
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign  # the name dkimpy's signer calls


class DkimKeyError(Exception):
    """A key file that cannot be read or used; the text says which and why."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str
    private: bytes  # as dkimpy takes it: PEM (RSA) or base64 seed (ed25519)


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
        public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    elif algorithm == ED25519:
        key_ed = ed25519.Ed25519PrivateKey.generate()
        seed = key_ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        raw_public = key_ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        private = b"ed25519\n" + base64.b64encode(seed) + b"\n"
        record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public).decode()}"
    else:
        raise DkimKeyError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    write_file_atomically(path, private, mode=0o600, owner=owner)
    return path, record


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
    """The key in `path`, tried once: a key dkimpy cannot sign with is refused here, naming
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
    except Exception as e:  # dkimpy says why in its own words
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


def sign(message: bytes, key: DkimKey) -> bytes:
    """The DKIM-Signature header line(s) for `message` (LF line endings), ending in LF; b""
    (the message goes unsigned, with a warning) when dkimpy cannot read its header section."""
    counts = Counter(field.name.lower() for field in parse_header_section(message).fields)
    headers = []
    for name in SIGNED_HEADERS:
        headers += [name] * (counts[name] + (1 if name in OVERSIGNED else 0))
    try:
        signature = dkim.sign(
            message, key.selector.encode(), key.domain.encode(), key.private,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=[h.encode() for h in headers],
            signature_algorithm=key.algorithm.encode(), linesep=b"\n",
        )
    except dkim.MessageFormatError as e:
        # dkimpy reads no obsolete syntax ("Received : x", RFC 5322 4.5) nor a non-ASCII field
        # name; such a message is valid enough to send (the intake took it), so it goes unsigned.
        log.warn("not DKIM-signed for {domain}: {error}", domain=key.domain, error=str(e)[:200])
        return b""
    return signature if signature.endswith(b"\n") else signature + b"\n"


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



