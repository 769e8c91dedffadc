"""The Sender Rewriting Scheme (SRS) for mail our aliases forward to other hosts.

An alias that sends a message on to a remote address would otherwise relay it with the
original envelope sender, whose domain's SPF does not list us: the destination sees an
SPF failure, and a DMARC failure when the message was not DKIM-signed (RFC 7208 1.2.3,
RFC 7960 3.2.1). So the return path of forwarded mail is rewritten into our domain, and
bounces to it are sent on to the original sender. The format is Shevek's SRS as libsrs2
and postsrsd implement it ("Sender Rewriting Scheme", Shevek, 2004):

    SRS0=HHHHHH=TT=orig-domain=orig-local@our-domain
    SRS1=HHHHHH=first-forwarder==HHHHHH=TT=orig-domain=orig-local@our-domain

- `HHHHHH`: HMAC-SHA1 under our key, base64, of the lower-cased fields that follow it
  (SRS0: stamp, domain, local; SRS1: the first forwarder's domain and the rest), compared
  without case, as libsrs2 does, because relays may change the case of a local part. Six
  characters where libsrs2 defaults to four: compared without case each is worth about
  five bits, and 30 bits keep a forger from guessing a relay through us by trying RCPTs.
- `TT`: the day (seconds since the epoch / 86400, modulo 1024) in two base32 characters;
  an address older than `max_age_days` (21 by default, as postsrsd) no longer verifies, and
  a stamp "from the future" counts as 1024 days old (libsrs2's srs_timestamp_check).
- SRS1 is for mail that reaches us with someone else's SRS0 return path and that we
  forward again: we keep their SRS0 part intact (we cannot verify it) and add our hash,
  so a bounce goes back to the first forwarder, who knows the original sender.

The key is 32 random bytes in `state_dir/srs.key` (0600), made once and kept: SRS
addresses in mail already out there must keep verifying for `max_age_days`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from pathlib import Path

from mailhost.ops.keyfile import ensure_secret
from mailhost.ops.ownership import owner_of

KEY_NAME = "srs.key"
KEY_BYTES = 32
SRS0, SRS1 = "SRS0", "SRS1"
SEPARATOR = "="  # what we write after SRS0/SRS1
SEPARATORS = "=+-"  # what libsrs2 accepts there (its configurable separators)
HASH_CHARS = 6
MAX_AGE_DAYS = 21
TIME_PRECISION = 86400  # one day
TIME_SLOTS = 1024  # two base32 characters
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
LOCAL_PART_LIMIT = 64  # RFC 5321 4.5.3.1.1: our own SMTP server refuses longer ones at RCPT

# A local part we can carry inside ours unquoted: dot-atom text (RFC 5321 4.1.2), UTF-8 allowed
# (RFC 6531). A quoted one ("a b"@x) would need quoting of the whole SRS address: left as it is.
_CARRIED = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+")
_DOMAIN = re.compile(r"[A-Za-z0-9\-.\u0080-\U0010ffff]+")


def is_srs(local_part: str) -> bool:
    """Whether a local part has the SRS0/SRS1 form (valid or not), as libsrs2's srs_is_srs0/1."""
    return len(local_part) > 4 and local_part[:4].upper() in (SRS0, SRS1) and local_part[4] in SEPARATORS


class Srs:
    """Rewrites return paths of forwarded mail and reverses them, with one key."""

    def __init__(self, key: bytes, max_age_days: int = MAX_AGE_DAYS, clock: Callable[[], float] = time.time) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an SRS key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self.max_age_days = max_age_days
        self.clock = clock

    # --- forward ---------------------------------------------------------------------

    def forward(self, sender: str, our_domain: str) -> str | None:
        """The return path for mail from `sender` that we forward, in `our_domain`; None when
        it cannot be carried (a quoted local part, an address literal, or a result longer
        than a local part may be: the caller then keeps `sender`)."""
        local, at, domain = sender.rpartition("@")
        if not at or not local or not _CARRIED.fullmatch(local) or not _DOMAIN.fullmatch(domain):
            return None
        if local[:4].upper() == SRS0 and is_srs(local):
            # Someone else's SRS0: keep it whole, behind their domain (libsrs2 srs_compile_guarded).
            rest = local[4:]
            made = f"{SRS1}{SEPARATOR}{self._hash(domain, rest)}={domain}={rest}"
        elif local[:4].upper() == SRS1 and is_srs(local):
            # Someone's SRS1 (possibly ours): keep its first forwarder and original, rehash with our key.
            parts = local[5:].split("=", 2)
            if len(parts) != 3 or not parts[1]:
                return None
            _, first, rest = parts
            made = f"{SRS1}{SEPARATOR}{self._hash(first, rest)}={first}={rest}"
        else:
            stamp = self.stamp()
            made = f"{SRS0}{SEPARATOR}{self._hash(stamp, domain, local)}={stamp}={domain}={local}"
        if len(made.encode("utf-8")) > LOCAL_PART_LIMIT:
            return None
        return f"{made}@{our_domain}"

    # --- reverse ---------------------------------------------------------------------

    def reverse(self, local_part: str) -> str | None:
        """Where mail to the SRS address with `local_part` (at one of our domains) goes: the
        original sender for SRS0, the first forwarder's SRS0 address for SRS1; None when it is
        not one of ours: garbled, forged (the hash does not verify) or expired."""
        if not is_srs(local_part) or len(local_part.encode("utf-8")) > LOCAL_PART_LIMIT:
            return None
        tag, body = local_part[:4].upper(), local_part[5:]
        if tag == SRS0:
            parts = body.split("=", 3)
            if len(parts) != 4 or not all(parts):
                return None
            given, stamp, domain, local = parts
            if not self._verify(given, stamp, domain, local) or not self.fresh(stamp):
                return None
            return f"{local}@{domain}"
        parts = body.split("=", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return None
        given, first, rest = parts
        if not self._verify(given, first, rest):
            return None
        return f"{SRS0}{rest}@{first}"

    # --- the time stamp ------------------------------------------------------------------

    def stamp(self) -> str:
        """Today, as two base32 characters."""
        day = int(self.clock() // TIME_PRECISION) % TIME_SLOTS
        return BASE32[day >> 5] + BASE32[day & 31]

    def fresh(self, stamp: str) -> bool:
        """Whether `stamp` is from the last `max_age_days` days (modulo 1024 days: a stamp
        ahead of today is one from the previous cycle, so long expired)."""
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in BASE32 for c in stamp):
            return False
        then = BASE32.index(stamp[0]) << 5 | BASE32.index(stamp[1])
        now = int(self.clock() // TIME_PRECISION) % TIME_SLOTS
        if now < then:
            now += TIME_SLOTS
        return now - then <= self.max_age_days

    # --- the hash ------------------------------------------------------------------------

    def _hash(self, *fields: str) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha1)
        for field in fields:
            mac.update(field.lower().encode("utf-8", "surrogatepass"))
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_CHARS]

    def _verify(self, given: str, *fields: str) -> bool:
        if len(given) != HASH_CHARS:
            return False
        return hmac.compare_digest(given.lower().encode("utf-8", "surrogatepass"),
                                   self._hash(*fields).lower().encode("ascii"))


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_NAME


def daemon_srs(state_dir: Path, max_age_days: int = MAX_AGE_DAYS) -> Srs:
    """The daemon's SRS, its key made when missing (owned like the rest of state_dir)."""
    key = ensure_secret(key_path(state_dir), KEY_BYTES, "an SRS key", owner_of(Path(state_dir)))
    return Srs(key, max_age_days)
