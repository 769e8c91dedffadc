"""Reading complaint reports: the Abuse Reporting Format of RFC 5965, as feedback loops
send it (Yahoo's CFL, Microsoft's JMRP, Validity's and the other providers' FBLs).

A report is `multipart/report; report-type=feedback-report` (RFC 5965 2): a human part,
a `message/feedback-report` part of fields (Feedback-Type, User-Agent, Version,
Original-Mail-From, Original-Rcpt-To, Arrival-Date, Source-IP, Reported-Domain, ...;
RFC 5965 3.1-3.2), and the original message or its header section (`message/rfc822`
or `text/rfc822-headers`, RFC 5965 2 (c)).

The complained-about recipient is, first found:

1. the report's Original-Rcpt-To (RFC 5965 3.2);
2. the original's X-HmXmrOriginalRecipient (Microsoft's JMRP often gives no other);
3. the original's VERP return path (Original-Mail-From, else its Return-Path), decoded
   with feedback.suppression.verp_recipient: what survives when an FBL redacts the
   recipient's address, as many do;
4. the original's To:, when it names exactly one address.

A value that is redacted ("xxxxx@yahoo.com", "redacted@...") is no address. This reads
mail from anyone: anything malformed gives None, the work is bounded (bytes read,
fields, parts), and nothing raises into the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailhost.feedback.suppression import (VERP_PREFIX, _body_bytes, _clean, _headers_only, _is_address, _parts,
                                           _typed_address, verp_recipient)
from mailhost.message import HeaderSection, domain_of, parse_address_list, parse_header_section

READ_LIMIT = 4 * 1024 * 1024  # bytes of a report read: the fields and the original's header section come first
PART_LIMIT = 64 * 1024  # bytes of the feedback-report part read (RFC 5965 fields are a few lines)
HEADER_LIMIT = 256 * 1024  # bytes of the original read for its header section
FIELD_LIMIT = 200  # characters kept of a text field (User-Agent, Feedback-Type, ...)

# RFC 5965 3.1 / RFC 6430 / RFC 6591: the types that say "the recipient did not want this".
# not-spam is the opposite, auth-failure a DMARC failure report and virus a filter's finding:
# none of those says anything about the recipient's wishes.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "other"})

_REPORT_PART = "message/feedback-report"
_ORIGINAL_PARTS = ("message/rfc822", "text/rfc822-headers")
_REDACTED = re.compile(r"^[\"']?(?:[x*#._-]+|.*redacted.*|masked|unknown|undisclosed.*|hidden)[\"']?$", re.IGNORECASE)
_ANGLE = re.compile(r"<([^<>\s]+)>")


@dataclass(frozen=True)
class Complaint:
    """One complaint report about one recipient of our mail."""

    recipient: str
    found_by: str  # original-rcpt-to | x-hmxmroriginalrecipient | verp | to
    feedback_type: str  # abuse, fraud, other (RFC 5965 3.1)
    user_agent: str  # the reporting system: "Yahoo!-Mail-Feedback/2.0", "Microsoft Junk Mail Reporting Program"
    message_id: str  # the original's Message-ID, without <>; "" when not given
    sender: str  # the original's From: address, else its (non-VERP) envelope sender; "" when neither
    return_path: str  # the original's envelope sender as the report gives it; "" when not given
    source_ip: str = ""
    reported_domain: str = ""
    arrival_date: str = ""

    @property
    def sender_domains(self) -> set[str]:
        """The domains the original claims to be from (From:, envelope sender): whether it was
        our mail is the intake's question."""
        return {domain_of(a).lower() for a in (self.sender, self.return_path) if a and "@" in a}


def parse_arf(message: bytes) -> Complaint | None:
    """The complaint an RFC 5965 report makes, or None: not a feedback report, not a
    complaint type, no recipient to be found, or anything malformed."""
    try:
        return _complaint(bytes(message))
    except Exception:  # noqa: BLE001 - hostile input must not take the caller down
        return None


def is_feedback_report(message: bytes) -> bool:
    """A cheap look at the top header section: does it say multipart/report of type
    feedback-report? (For the intake's hot path; parse_arf decides.)"""
    block = message[:HEADER_LIMIT]
    end = block.find(b"\n\n")
    head = (block if end < 0 else block[:end]).lower()
    return b"multipart/report" in head and b"feedback-report" in head


def _complaint(data: bytes) -> Complaint | None:
    truncated = len(data) > READ_LIMIT
    top = _headers_only(data[:READ_LIMIT])
    boundary = top.get_boundary()
    if top.get_content_type() != "multipart/report" or not isinstance(boundary, str) or not boundary:
        return None
    report_type = top.get_param("report-type")
    if not isinstance(report_type, str) or report_type.strip().lower() != "feedback-report":
        return None
    body = _body_bytes(top)
    if truncated:
        # Close what was cut, so the part holding the original's header section is read;
        # below, a cut original counts only when its header section ended before the cut.
        body += b"\n--" + boundary.encode("utf-8", "surrogateescape") + b"--\n"
    fields: HeaderSection | None = None
    original: HeaderSection | None = None
    for count, raw_part in enumerate(_parts(body, boundary)):
        if count >= 10:
            break  # RFC 5965 reports have three parts
        part = _headers_only(raw_part[:READ_LIMIT])
        kind = part.get_content_type()
        if kind == _REPORT_PART and fields is None:
            fields = parse_header_section(_body_bytes(part)[:PART_LIMIT].replace(b"\r\n", b"\n").lstrip(b"\n"))
        elif kind in _ORIGINAL_PARTS and original is None:
            text = _body_bytes(part)[:HEADER_LIMIT].replace(b"\r\n", b"\n")
            if b"\n\n" in text or (kind == "text/rfc822-headers" and not truncated):
                original = parse_header_section(text)
    if fields is None:
        return None
    return _from_parts(fields, original or HeaderSection())


def _from_parts(fields: HeaderSection, original: HeaderSection) -> Complaint | None:
    feedback_type = _text(fields.get("Feedback-Type")).lower()
    if feedback_type not in COMPLAINT_TYPES:
        return None
    return_path = _typed_address(_text(fields.get("Original-Mail-From")) or None) or _bracketed(
        original.get("Return-Path"))
    senders = [a for a in parse_address_list(original.get("From") or "") or [] if _is_address(a)]
    found = _recipient(fields, original, return_path or "")
    if found is None:
        return None
    recipient, found_by = found
    envelope_sender = "" if (return_path or "").lower().startswith(VERP_PREFIX) else return_path
    return Complaint(
        recipient=recipient,
        found_by=found_by,
        feedback_type=feedback_type,
        user_agent=_text(fields.get("User-Agent")),
        message_id=_text((_bracketed(original.get("Message-ID")) or "")),
        sender=senders[0] if senders else envelope_sender,
        return_path=return_path or "",
        source_ip=_text(fields.get("Source-IP"), 64),
        reported_domain=_text(fields.get("Reported-Domain"), 255),
        arrival_date=_text(fields.get("Arrival-Date") or fields.get("Received-Date"), 100),
    )


def _recipient(fields: HeaderSection, original: HeaderSection, return_path: str) -> tuple[str, str] | None:
    rcpt_to = _usable(_typed_address(_text(fields.get("Original-Rcpt-To")) or None))
    if rcpt_to:
        return rcpt_to, "original-rcpt-to"
    microsoft = _usable(_bracketed(original.get("X-HmXmrOriginalRecipient")))
    if microsoft:
        return microsoft, "x-hmxmroriginalrecipient"
    to = parse_address_list(original.get("To") or "") or []
    candidates = [a for a in to if _usable(a)]
    for path in (return_path, _bracketed(original.get("Return-Path")) or ""):
        local, at, _ = path.rpartition("@")
        decoded = verp_recipient(local, candidates) if at else None
        if decoded and _is_address(decoded):
            return decoded, "verp"
    if len(to) == 1 and _usable(to[0]):
        return to[0], "to"
    return None


def _usable(address: str | None) -> str | None:
    """`address` when it is a mail address that has not been redacted."""
    if not address or not _is_address(address):
        return None
    local = address.rpartition("@")[0]
    return None if _REDACTED.match(local) else address


def _bracketed(value: str | None) -> str | None:
    """The address in `<...>` (Return-Path:, Message-ID:, a display-name form), else the bare value."""
    if not value:
        return None
    match = _ANGLE.search(value[:1000])
    address = match.group(1) if match else value.strip()
    return address if address and len(address) <= 998 and " " not in address else None


def _text(value: str | None, limit: int = FIELD_LIMIT) -> str:
    return _clean(value or "", limit)
