"""The server side of the SASL mechanisms SMTP AUTH offers (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Only decoding lives here; the session drives the exchange and twisted.cred
checks the result.
"""

from __future__ import annotations

import base64
import binascii

from mailhost.smtp.wire import SMTPError

MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")
CANCEL = "*"


def decode_response(text: str) -> bytes:
    """A client's base64 response; "=" is the empty initial response (RFC 4954 4). 501 5.5.2 when not base64."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SMTPError(501, "5.5.2", "Cannot decode response (not base64)") from None


def utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPError(501, "5.5.2", "Cannot decode response (not UTF-8)") from None


def parse_plain(data: bytes) -> tuple[str, str, str]:
    """PLAIN's message `authzid NUL authcid NUL password` -> (authzid, authcid, password)."""
    parts = data.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SMTPError(501, "5.5.2", "Malformed PLAIN response (authzid NUL authcid NUL password)")
    authzid, authcid, password = (utf8(part) for part in parts)
    return authzid, authcid, password
