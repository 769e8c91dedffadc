"""The fix-ups our own senders' mail gets (RFC 6409 8): Message-ID: and Date: when the
client left them out. Which origins get them is the intake's decision (cleanup.py)."""

from __future__ import annotations

from email.utils import formatdate, make_msgid

from mailhost.message import HeaderSection


def missing_headers(headers: HeaderSection, hostname: str) -> bytes:
    """Message-ID: and Date: lines for the ones the message lacks (LF line endings)."""
    lines = ""
    if headers.get("Message-ID") is None:
        lines += f"Message-ID: {make_msgid(domain=hostname)}\n"
    if headers.get("Date") is None:
        lines += f"Date: {formatdate(localtime=True)}\n"
    return lines.encode("ascii")


CAMPAIGN_FIELDS = ("X-Campaign-ID", "X-Mailer-Campaign")
_FIELD_LIMIT = 64  # characters of each part of a Feedback-ID:


def feedback_id(headers: HeaderSection, template: str, user: str, sender_domain: str) -> bytes:
    """A Feedback-ID: line (Gmail's feedback loop: "a:b:c:SenderId") from `template` when
    the message has none; the campaign comes from X-Campaign-ID: or X-Mailer-Campaign:.
    Each value is made safe first: printable ASCII, no ":" (the field separator)."""
    if headers.get("Feedback-ID") is not None:
        return b""
    campaign = next((value for name in CAMPAIGN_FIELDS if (value := headers.get(name))), "")
    value = template.format(campaign=_part(campaign), user=_part(user), sender_domain=_part(sender_domain))
    value = "".join(c if " " <= c <= "~" else "_" for c in value).strip()
    return f"Feedback-ID: {value[:900]}\n".encode("ascii")


def _part(text: str) -> str:
    """One value of the template: printable ASCII, ":" and white space as "-"."""
    return "".join(c if "!" <= c <= "~" and c != ":" else "-" for c in text.strip())[:_FIELD_LIMIT]
