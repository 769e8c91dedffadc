"""One-click unsubscribe (RFC 8058): tokens, the key they are signed with, and the headers.

A token names one recipient and one sender domain (the envelope sender's, which is what
RCPT checks a scoped suppression against) and carries an HMAC-SHA256 of both under a key
of 32 random bytes kept in `state_dir/unsubscribe.key`. It is verified from itself alone:
no table of issued tokens, no write on the sending path.

Form (everything lower case, so a relay that changes the case of a local part changes
nothing; URL-safe and a dot-atom, so it fits a path and a local part):

    1 <kind> <mac> . <recipient local> = <recipient domain> [= <sender domain>]

- `1` is the format version; `kind` is `h` (the https link: 26 base32 characters of the
  MAC, 130 bits) or `m` (the mailto form: 13 characters, 65 bits, enough against guessing
  over SMTP, where each try costs a round trip).
- The address parts keep `a-z 0-9 . _ -`; any other octet of their UTF-8 is `+` and two
  hex digits (`bob+news` is `bob+2bnews`), so `=` only ever separates.
- The mailto form leaves the sender domain out when it is the domain the mail goes to
  (`unsubscribe+TOKEN@shop.example` for mail from shop.example): the local part has to
  fit in 64 octets (RFC 5321 4.5.3.1.1), and this is what makes it fit for most
  addresses. When it still does not fit (a recipient longer than about 36 characters),
  the message carries the https link only: RFC 8058 one-click needs only that one, and a
  shortened form (a hash of the recipient) could not be verified without a lookup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from mailhost.feedback.suppression import SuppressionList, address_key, scope_key
from mailhost.ops.keyfile import KeyFileError, ensure_secret, read_secret
from mailhost.ops.ownership import Owner, owner_of

KEY_NAME = "unsubscribe.key"
KEY_BYTES = 32
MAILTO_PREFIX = "unsubscribe+"
LOCAL_PART_LIMIT = 64  # RFC 5321 4.5.3.1.1
LINE_LIMIT = 998  # RFC 5322 2.1.1
VERSION = "1"
LINK, MAILTO = "h", "m"
_MAC_CHARS = {LINK: 26, MAILTO: 13}

_KEEP = re.compile(r"[a-z0-9._-]")
_TOKEN = re.compile(r"^1([hm])([a-z2-7]+)\.([a-z0-9._+=-]+)$")
_ESCAPE = re.compile(r"\+([0-9a-f]{2})")


# The key file cannot be used; str(error) says which file and what to do.
UnsubscribeKeyError = KeyFileError


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token asks: stop mail from `scope` (a sender domain) to `recipient`."""

    recipient: str  # the address key (suppression.address_key)
    scope: str


class UnsubscribeTokens:
    """Makes and checks tokens with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an unsubscribe key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key

    def link_token(self, recipient: str, sender: str) -> str:
        """The token of an https link: unsubscribe `recipient` from mail of `sender`'s domain."""
        key, scope = address_key(recipient), scope_key(sender)
        return self._token(LINK, key, scope, f"{_escape_address(key)}={_escape(scope)}")

    def mailto_token(self, recipient: str, sender: str, mail_domain: str) -> str | None:
        """The token for `unsubscribe+TOKEN@mail_domain`, or None when that local part would
        be longer than 64 octets or not a dot-atom."""
        key, scope = address_key(recipient), scope_key(sender)
        payload = _escape_address(key)
        if scope != scope_key(mail_domain):
            payload += f"={_escape(scope)}"
        token = self._token(MAILTO, key, scope, payload)
        local = MAILTO_PREFIX + token
        if len(local) > LOCAL_PART_LIMIT or ".." in local or local.endswith("."):
            return None
        return token

    def verify(self, token: str, mail_domain: str | None = None) -> Unsubscribe | None:
        """The request a token makes, or None for anything forged, garbled or of another key.
        `mail_domain`: the domain a mailto request was sent to (its default sender domain)."""
        token = token.lower()
        match = _TOKEN.match(token)
        if match is None:
            return None
        kind, mac, payload = match.groups()
        parts = payload.split("=")
        if len(parts) == 2 and mail_domain is not None:
            parts.append(_escape(scope_key(mail_domain)))
        if len(parts) != 3 or len(mac) != _MAC_CHARS[kind]:
            return None
        local, domain, scope = (_unescape(p) for p in parts)
        if not local or not domain or not scope:
            return None
        recipient = f"{local}@{domain}"
        # One spelling only: what we would have made for this recipient and scope.
        if address_key(recipient) != recipient or scope_key(scope) != scope:
            return None
        if not hmac.compare_digest(mac, self._mac(kind, recipient, scope)):
            return None
        return Unsubscribe(recipient, scope)

    def _token(self, kind: str, recipient: str, scope: str, payload: str) -> str:
        return f"{VERSION}{kind}{self._mac(kind, recipient, scope)}.{payload}"

    def _mac(self, kind: str, recipient: str, scope: str) -> str:
        text = f"mailhost-unsubscribe\0{VERSION}{kind}\0{recipient}\0{scope}".encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, text, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii").lower()[:_MAC_CHARS[kind]]


def is_mailto_address(local_part: str) -> bool:
    """Whether a local part is in the unsubscribe+TOKEN form (valid or not)."""
    return local_part.lower().startswith(MAILTO_PREFIX)


def list_unsubscribe_headers(tokens: UnsubscribeTokens, base_url: str | None, recipient: str, sender: str,
                             mail_domain: str) -> bytes:
    """`List-Unsubscribe:` (RFC 2369 3.2) with the https link and the mailto form, and
    `List-Unsubscribe-Post:` (RFC 8058 3.1) when there is an https link; b"" when neither
    fits in a line."""
    uris = []
    if base_url is not None:
        link = f"<{base_url}/unsubscribe/{tokens.link_token(recipient, sender)}>"
        if len(link) < LINE_LIMIT - 30:
            uris.append(link)
    mailto = tokens.mailto_token(recipient, sender, mail_domain)
    if mailto is not None:
        uris.append(f"<mailto:{MAILTO_PREFIX}{mailto}@{mail_domain}>")
    if not uris:
        return b""
    lines = "List-Unsubscribe: " + ",\n ".join(uris) + "\n"
    if uris[0].startswith("<https:"):
        # RFC 8058 3.1: only with an https URI, and never without List-Unsubscribe.
        lines += "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
    return lines.encode("utf-8")


def base_url(public_url: str | None, endpoint: str | None, hostname: str) -> str | None:
    """Where the https links point: `[http] public_url`, else https://hostname with the
    endpoint's port when it is not 443; None when no HTTPS listener is configured."""
    if public_url:
        return public_url.rstrip("/")
    if endpoint is None:
        return None
    port = endpoint_port(endpoint)
    return f"https://{hostname}" + (f":{port}" if port not in (None, 443) else "")


def endpoint_port(description: str) -> int | None:
    """The port of a tcp/tcp6/ssl endpoint string ("tcp:8443:interface=127.0.0.1"), or None."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    fields = rest.replace("\\:", "\0").split(":")
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    port = options.get("port", fields[0] if fields and "=" not in fields[0] else "")
    return int(port) if port.isdigit() else None


def record_unsubscribe(suppression: SuppressionList, request: Unsubscribe, via: str) -> bool:
    """Suppress `request.recipient` for mail from `request.scope` and tell the campaign tools
    (an "unsubscribed" event, then the list's own "suppressed"). Blocking: on a thread.
    False when it already was (a provider may POST twice): nothing is recorded again."""
    if suppression.is_suppressed(request.recipient, request.scope) is not None:
        return False
    if suppression.events is not None:
        suppression.events.record("unsubscribed", recipient=request.recipient, sender=request.scope,
                                  scope=request.scope, via=via)
    suppression.add(request.recipient, "", f"unsubscribed ({via})", source="unsubscribe", category="unsubscribe",
                    scope=request.scope)
    return True


# --- the key ------------------------------------------------------------------------------


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_NAME


def ensure_key(state_dir: Path, owner: Owner | None = None) -> bytes:
    """The key, made on first use (0600, given to `owner`) and kept for good: links in mail
    already sent must keep working. Two processes making it at once end with one key."""
    return ensure_secret(key_path(state_dir), KEY_BYTES, "an unsubscribe key", owner)


def read_key(state_dir: Path) -> bytes | None:
    """The key, or None when none was made yet."""
    return read_secret(key_path(state_dir), KEY_BYTES, "an unsubscribe key")


def daemon_tokens(state_dir: Path) -> UnsubscribeTokens:
    """The daemon's tokens (the key made when missing, owned like the rest of state_dir)."""
    return UnsubscribeTokens(ensure_key(state_dir, owner_of(Path(state_dir))))


def _escape(text: str) -> str:
    return "".join(ch if _KEEP.match(ch) else "".join(f"+{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
                   for ch in text)


def _escape_address(key: str) -> str:
    local, _, domain = key.rpartition("@")
    return f"{_escape(local)}={_escape(domain)}"


def _unescape(text: str) -> str:
    """The text `_escape` made `text` from, or "" when `text` is not such an escape."""
    if "+" in _ESCAPE.sub("", text):
        return ""
    raw = bytearray()
    at = 0
    for match in _ESCAPE.finditer(text):
        raw += text[at:match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        at = match.end()
    raw += text[at:].encode("ascii")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return decoded if _escape(decoded) == text else ""
