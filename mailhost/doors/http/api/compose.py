"""What POST /api/v1/messages takes, as a message and its envelope for the intake.

JSON (`application/json`) is built into a MIME message with the stdlib's `email` package
(text and/or html as multipart/alternative, attachments as multipart/mixed, RFC 2045-2047
encodings chosen by it); `bcc` recipients are in the envelope only. A raw message
(`message/rfc822`) is taken as it is: its envelope comes from the `from` and `to` query
parameters, else from its From: and To:/Cc:/Bcc: fields (as `sendmail -t`), and Bcc: is
removed. Either way the result has LF line endings, as the intake takes messages.
"""

from __future__ import annotations

import binascii
import email.policy
import re
from base64 import b64decode
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from mailhost.doors.http.api.errors import ApiError, bad_field, missing
from mailhost.message import drop_field, parse_address_list, parse_header_section, split_message
from mailhost.smtp.wire import SMTPError, parse_path

POLICY = email.policy.default.clone(linesep="\n")  # the intake's line endings
# Fields the request's own keys set, and those only this host or the intake writes.
RESERVED_HEADERS = frozenset({"from", "to", "cc", "bcc", "subject", "mime-version", "content-type",
                              "content-transfer-encoding", "content-disposition", "received", "return-path",
                              "dkim-signature", "authentication-results", "delivered-to"})
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable US-ASCII except ":"
MAX_HEADERS = 100
MAX_ATTACHMENTS = 100
_TEXT_FIELDS = ("subject", "text", "html")


@dataclass(frozen=True)
class Composed:
    sender: str  # the envelope sender (an address)
    recipients: list[str]
    message: bytes  # LF line endings


def _string(data: dict[str, Any], field: str, required: bool = False) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise missing(field, "a string")
        return None
    if not isinstance(value, str):
        raise bad_field(field, f"{field} must be a string")
    return value


def _address(text: str, field: str, allow_name: bool = True) -> Address:
    """One mailbox ("Name <addr>" or "addr") as the email package's Address; 400 naming `field`."""
    if not isinstance(text, str) or not text.strip():
        raise bad_field(field, f"{field} must be a mail address such as alice@example.test")
    if any(c in text for c in "\r\n\0"):
        raise bad_field(field, f"{field} must be one line")
    found = getaddresses([text]) if allow_name else [("", text.strip())]
    if len(found) != 1:
        raise bad_field(field, f"{field} must be one mail address")
    name, addr = found[0]
    try:
        parse_path(f"<{addr}>", utf8=True, null_ok=False, kind="recipient")
        return Address(display_name=name, addr_spec=addr)
    except (SMTPError, ValueError, IndexError):
        raise bad_field(field, f"{field}: {text[:100]!r} is not a mail address such as alice@example.test") from None


def _addresses(data: dict[str, Any], field: str) -> list[Address]:
    value = data.get(field)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad_field(field, f"{field} must be an address or a list of addresses")
    return [_address(item, field if isinstance(value, str) else f"{field}[{i}]") for i, item in enumerate(items)]


def _recipient_count(recipients: list[str], limit: int, field: str = "to") -> list[str]:
    unique = list(dict.fromkeys(recipients))
    if not unique:
        raise missing(field, "at least one recipient in to, cc or bcc")
    if len(unique) > limit:
        raise bad_field(field, f"{len(unique)} recipients; at most {limit} per message (limits.recipients)",
                        "too_many_recipients")
    return unique


def compose(data: Any, max_recipients: int) -> Composed:
    """The message a JSON request describes; ApiError (400) naming the field at fault."""
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    known = {"from", "to", "cc", "bcc", "subject", "text", "html", "headers", "attachments"}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise bad_field(unknown[0][:60], f"unknown field {unknown[0][:60]!r} (known: {', '.join(sorted(known))})",
                        "unknown_field")
    sender = _address(_string(data, "from", required=True) or "", "from")
    to, cc, bcc = (_addresses(data, f) for f in ("to", "cc", "bcc"))
    recipients = _recipient_count([a.addr_spec for a in [*to, *cc, *bcc]], max_recipients)
    subject, text, html = (_string(data, f) for f in _TEXT_FIELDS)
    if text is None and html is None:
        raise missing("text", "text, html or both")
    message = EmailMessage(policy=POLICY)
    message["From"] = sender
    if to:
        message["To"] = to
    if cc:
        message["Cc"] = cc
    if subject is not None:
        if any(c in subject for c in "\r\n"):
            raise bad_field("subject", "subject must be one line")
        message["Subject"] = subject
    _add_headers(message, data.get("headers"))
    if text is not None:
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
    else:
        message.set_content(html, subtype="html")
    _add_attachments(message, data.get("attachments"))
    try:
        wire = message.as_bytes(policy=POLICY)
    except (ValueError, TypeError, UnicodeError) as error:
        raise ApiError(400, "bad_message", f"the message cannot be built: {error}"[:300]) from None
    return Composed(sender.addr_spec, recipients, wire)


def _add_headers(message: EmailMessage, headers: Any) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise bad_field("headers", f"headers must be an object of at most {MAX_HEADERS} names and string values")
    for name, value in headers.items():
        field = f"headers.{name[:60]}"
        if not _FIELD_NAME.fullmatch(name):
            raise bad_field(field, "a header field name is printable US-ASCII without ':' (RFC 5322 2.2)")
        if name.lower() in RESERVED_HEADERS:
            raise bad_field(field, f"{name} is set by the request's own fields or by this server, not by headers")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0") or len(value) > 998:
            raise bad_field(field, "a header value is one line of at most 998 characters")
        message[name] = value


def _add_attachments(message: EmailMessage, attachments: Any) -> None:
    if attachments is None:
        return
    if not isinstance(attachments, list) or len(attachments) > MAX_ATTACHMENTS:
        raise bad_field("attachments", f"attachments must be a list of at most {MAX_ATTACHMENTS} objects")
    for i, item in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise bad_field(where, "an attachment is an object with filename, content_type and content (base64)")
        filename = _string(item, "filename")
        content_type = _string(item, "content_type") or "application/octet-stream"
        content = item.get("content")
        if not isinstance(content, str):
            raise missing(f"{where}.content", "the attachment's bytes in base64")
        try:
            raw = b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise bad_field(f"{where}.content", "content must be base64 (RFC 4648 4)") from None
        maintype, _, subtype = content_type.partition("/")
        if not (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", maintype)
                and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", subtype)):
            raise bad_field(f"{where}.content_type", "content_type is type/subtype, such as application/pdf")
        if filename is not None and (any(c in filename for c in "\r\n\0/\\") or len(filename) > 255):
            raise bad_field(f"{where}.filename", "filename is a plain file name (no path) of at most 255 characters")
        if maintype.lower() in ("multipart", "message"):
            raise bad_field(f"{where}.content_type", "attach a message or multipart as application/octet-stream")
        if message.get_content_maintype() != "multipart" or message.get_content_subtype() != "mixed":
            message.make_mixed()
        message.add_attachment(raw, maintype=maintype, subtype=subtype, filename=filename)


def raw_message(body: bytes, sender: str | None, recipients: list[str], max_recipients: int) -> Composed:
    """A message/rfc822 body and the query's envelope (empty: taken from the header fields)."""
    message = body.replace(b"\r\n", b"\n")
    if b"\r" in message or b"\0" in message:
        raise ApiError(400, "bad_message", "the message has a bare CR or a NUL (RFC 5322 2.3)")
    if not message.strip():
        raise ApiError(400, "bad_message", "the message is empty")
    head, rest = split_message(message)
    headers = parse_header_section(message)
    if headers.malformed:
        raise ApiError(400, "bad_message", f"malformed header section: {headers.malformed[0]} (RFC 5322 2.2)")
    if sender is None:
        senders = [a for f in headers.all("From") for a in (parse_address_list(f.text) or [])]
        if len(senders) != 1:
            raise missing("from", "one From: address in the message, or the from query parameter")
        sender = senders[0]
    sender = _address(sender, "from", allow_name=False).addr_spec
    if not recipients:
        for name in ("To", "Cc", "Bcc"):
            for f in headers.all(name):
                found = parse_address_list(f.text)
                if found is None:
                    raise bad_field(name.lower(), f"the {name}: field is not a list of addresses")
                recipients += found
    checked = [_address(r, "to", allow_name=False).addr_spec for r in recipients]
    return Composed(sender, _recipient_count(checked, max_recipients), drop_field(head, b"bcc") + rest)
