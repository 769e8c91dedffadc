"""Delivery status notifications (RFC 3464): bounces, delay warnings and, when the sender
asked with NOTIFY=SUCCESS (RFC 3461), "delivered" and "relayed" reports.

`build_dsn` turns a queued message's envelope and the recipients to report on
into a multipart/report message, built with the stdlib `email` package:

    multipart/report; report-type=delivery-status
      1. text/plain                 what happened, for a person (Postfix wording)
      2. message/delivery-status    the same, for a program (RFC 3464 fields)
      3. text/rfc822-headers        the original header block, or message/rfc822 (the
                                    whole message) in a failure report when the sender
                                    asked RET=FULL and it is within RETURN_FULL_LIMIT

Output format (chosen here, relied on by callers): bytes with LF line endings,
the form our Maildir and spool files hold; `wire.stuff_from_lf` makes CRLF for
the wire. The policy is `email.policy.default` with `linesep="\\n"`,
`max_line_length=78` and `refold_source="none"`.

What it is safe to assume about the output:

- The report is 7-bit ASCII, with one exception: when the sender's address is
  non-ASCII (an SMTPUTF8 sender), the To: header carries it as raw UTF-8 (the
  bounce needs SMTPUTF8 to reach that address anyway). Non-ASCII text for
  people goes in part 1 as quoted-printable, and a header block with 8-bit
  bytes goes in part 3 as quoted-printable (RFC 3462 allows it for
  text/rfc822-headers).
- Text from outside (the remote server's reply, host names, addresses) never
  makes a header or a MIME part: control characters (C0, C1, DEL,
  Unicode line/paragraph separators, format and unassigned characters) become
  spaces or "?", runs of white space collapse, length is capped (a reply at
  `REPLY_LIMIT` characters), and fields are folded by this module: at spaces
  to 78 columns, and a word too long for a 998-octet line is cut (RFC 5322
  2.1.1). Fields in part 2 are ASCII: other characters become "?", except in
  addresses, which use RFC 6533 `utf-8` address type with its xtext form.
- Every line of the output is at most 998 octets, except lines of the
  returned header block, which are copied as they are apart from line endings
  (CRLF and bare CR become LF). The MIME boundary is picked by `email`'s
  generator so that no line of any part is a delimiter line for it (returned
  text cannot end or open a part).

Dates are UTC ("+0000"). Received-From-MTA (RFC 3464 2.2.4) carries
`envelope.client` when it is set.

RFC 3461's parameters come from the envelope: ENVID becomes Original-Envelope-Id
(RFC 3464 2.2.1) and a recipient's ORCPT its Original-Recipient (2.3.1), both
xtext-decoded as stored and cleaned like any text from outside; RET=FULL returns the
whole message in a failure report (RFC 3461 4.3: RET is about "failed" DSNs; every
other report and RET=HDRS return the header block, and so does a failure report
without RET, as before). Which recipients a report names (NOTIFY) is the caller's
choice. A returned message/rfc822 part keeps the message's own lines as they are.

`Recipient` has no time of its last attempt, so Last-Attempt-Date is `now`
for a recipient with `attempts > 0` (the report is built right after the
attempt that ended it) and omitted otherwise.
"""

from __future__ import annotations

import io
import re
import textwrap
import time
import unicodedata
from datetime import datetime, timezone
from email.generator import BytesGenerator
from email import message_from_bytes
from email.message import EmailMessage, Message, MIMEPart
from email.policy import compat32
from email.policy import default as _default_policy
from email.utils import format_datetime, make_msgid

from mailhost.message import original_headers
from mailhost.queue.envelope import Envelope, Recipient

__all__ = [
    "DELAY",
    "DELIVERED",
    "FAILURE",
    "RELAYED",
    "REPLY_LIMIT",
    "build_dsn",
]

FAILURE = "failure"
DELAY = "delay"
DELIVERED = "delivered"  # NOTIFY=SUCCESS, delivered to a mailbox here
RELAYED = "relayed"  # NOTIFY=SUCCESS, handed to a next hop that does not speak DSN
_ACTIONS = {FAILURE: "failed", DELAY: "delayed", DELIVERED: "delivered", RELAYED: "relayed"}
# As Postfix's bounce_size_limit: RET=FULL returns a bigger message's headers only.
RETURN_FULL_LIMIT = 50000  # octets

REPLY_LIMIT = 1000  # characters of a remote reply / local reason kept
ADDRESS_LIMIT = 320  # characters of an address kept (RFC 5321 4.5.3.1: 64 + 1 + 255)
ID_LIMIT = 200  # characters of a queue id kept
HOST_LIMIT = 255

_SOFT_LINE = 78  # RFC 5322 2.1.1: SHOULD
_HARD_LINE = 998  # RFC 5322 2.1.1: MUST
_TEXT_WIDTH = 76  # the human-readable part

_POLICY = _default_policy.clone(linesep="\n", max_line_length=_SOFT_LINE, refold_source="none")
_POLICY_UTF8 = _POLICY.clone(utf8=True)

_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_SMTP_REPLY = re.compile(r"^([2-5])[0-9][0-9](?:[ -]|$)")
_REPLY_STATUS = re.compile(r"^[2-5][0-9][0-9][ -]([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:[ ]|$)")
_STATUS = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$")
# Unicode categories that must not reach a header or a line of text as they are.
_SPACE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Zs"})  # controls, separators: a space
_BAD_CATEGORIES = frozenset({"Cf", "Cs", "Co", "Cn"})  # format, surrogate, private, unassigned: "?"


# ---------------------------------------------------------------------------
# Small helpers, tested on their own


# ---------------------------------------------------------------------------
# Cleaning text that came from outside


def _clean(text: str, limit: int) -> str:
    """One line of printable text: controls and separators become a space,
    format/surrogate/private/unassigned characters "?", white space collapses,
    at most `limit` characters (the last three "..." when cut)."""
    out = []
    for ch in text:
        if ch == " ":
            out.append(ch)
            continue
        category = unicodedata.category(ch)
        if category in _SPACE_CATEGORIES:
            out.append(" ")
        elif category in _BAD_CATEGORIES:
            out.append("?")
        else:
            out.append(ch)
    cleaned = re.sub(" +", " ", "".join(out)).strip(" ")
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip(" ") + "..."
    return cleaned


def _ascii(text: str) -> str:
    """`text` (already cleaned) with every non-ASCII character as "?"."""
    return text.encode("ascii", "replace").decode("ascii")


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: QCHAR as it is, anything else as \\x{HEX}."""
    out = []
    for ch in address:
        code = ord(ch)
        if 0x21 <= code <= 0x7E and ch not in "+=\\":
            out.append(ch)
        else:
            out.append("\\x{%02X}" % code)
    return "".join(out)


def _typed_address(address: str) -> str:
    """An address for Final-Recipient (already cleaned):
    `rfc822; addr`, or `utf-8; xtext` when it is not ASCII (RFC 6533 3)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _cut(word: str, limit: int) -> list[str]:
    """`word` in pieces of at most `limit` UTF-8 octets."""
    pieces: list[str] = []
    start = size = 0
    for i, ch in enumerate(word):
        n = _octets(ch)
        if size + n > limit:
            pieces.append(word[start:i])
            start, size = i, 0
        size += n
    pieces.append(word[start:])
    return pieces


def _fold(name: str, value: str) -> str:
    """`value` (one clean line, single spaces) folded for a field called
    `name`: breaks at spaces so lines stay within 78 columns where a word
    allows, and a word that would not fit a 998-octet line is cut into pieces
    (a space appears at each cut when the field is unfolded). Lengths are
    counted in UTF-8 octets (only To: may be non-ASCII)."""
    room = _HARD_LINE - len(name) - 2  # octets after "Name: " on the first line
    words: list[str] = []
    for word in value.split(" "):
        if word:
            words += _cut(word, room) if _octets(word) > room else [word]
    lines: list[str] = []
    line = f"{name}:"
    size = len(line)
    for i, word in enumerate(words):
        n = _octets(word)
        if i and size + 1 + n > _SOFT_LINE:
            lines.append(line)
            line, size = " " + word, 1 + n
        else:
            line, size = f"{line} {word}", size + 1 + n
    lines.append(line)
    return "\n".join(lines)[len(name) + 2 :]


def _set(message: Message, name: str, value: str) -> None:
    """Put a field we built and folded ourselves into `message` as it is."""
    message.set_raw(name, _fold(name, value))


def _date(timestamp: float) -> str:
    """An RFC 5322 date-time in UTC ("+0000": -0000 would mean "zone unknown")."""
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc).replace(microsecond=0))


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} day(s)"
    if seconds >= 3600:
        return f"{seconds // 3600} hour(s)"
    return f"{max(1, seconds // 60)} minute(s)"


# ---------------------------------------------------------------------------
# The report


def _status(recipient: Recipient, reply: str, kind: str) -> str:
    if _STATUS.match(recipient.status or ""):
        return recipient.status
    match = _REPLY_STATUS.match(reply)
    if match:
        return match.group(1)
    match = _SMTP_REPLY.match(reply)
    if match and match.group(1) in "45":
        return f"{match.group(1)}.0.0"
    return {FAILURE: "5.0.0", DELAY: "4.0.0"}.get(kind, "2.0.0")


def _human_text(
    envelope: Envelope,
    lines: list[str],
    *,
    hostname: str,
    kind: str,
    now: float,
    retry_until: float | None,
    full: bool = False,
) -> str:
    out = [f"This is the mail system at host {hostname}.", ""]
    if kind in (DELIVERED, RELAYED):
        out += [
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to mailbox you will",
            "receive no further notifications. Otherwise you may still receive",
            "notifications of mail delivery errors from other systems.",
        ]
    elif kind == FAILURE:
        out += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. "
            + ("It is attached below." if full else "Its headers are attached below."),
        ]
    else:
        out += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for more than {_span(now - envelope.arrival)}.",
        ]
        if retry_until is not None:
            out.append(f"It will be retried until it is {_span(retry_until - envelope.arrival)} old.")
    out += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for line in lines:
        out += textwrap.wrap(
            line,
            width=_TEXT_WIDTH,
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        out.append("")
    return "\n".join(out)


def build_dsn(
    envelope: Envelope,
    recipients: list[Recipient],
    original: bytes,
    *,
    hostname: str,
    kind: str,
    now: float | None = None,
    retry_until: float | None = None,
) -> bytes:
    """A delivery status notification for `recipients` (of `envelope`) to the
    envelope sender, as LF-terminated bytes (see the module docstring).

    `kind` is "failure" (a bounce, Action: failed), "delay" (a warning,
    Action: delayed; `retry_until`, epoch seconds, adds Will-Retry-Until),
    "delivered" or "relayed" (NOTIFY=SUCCESS reports).
    `original` is the queued message; its header block is returned (the whole
    of it in a failure report with RET=FULL, see the module docstring).
    `hostname` is this host's name
    (Reporting-MTA, MAILER-DAEMON@hostname, Message-ID). `now` defaults to the
    current time.

    Raises ValueError for the null sender (a DSN is never sent about a DSN,
    RFC 3464 2), an empty recipient list, an unknown kind, `retry_until` with
    a failure, or a `hostname` that is not a host name.
    """
    if envelope.sender == "":
        raise ValueError("no DSN for the null sender <>")
    if kind not in _ACTIONS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _ACTIONS))}, not {kind!r}")
    if retry_until is not None and kind != DELAY:
        raise ValueError("retry_until is for a delay warning only")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        raise ValueError(f"not a host name: {hostname!r}")
    hostname = hostname.rstrip(".")
    if now is None:
        now = time.time()

    sender = _clean(envelope.sender, ADDRESS_LIMIT)
    if not sender:
        raise ValueError("no DSN for an empty sender address")
    policy = _POLICY if sender.isascii() else _POLICY_UTF8
    action = _ACTIONS[kind]

    # Part 2 first: it decides what part 1 says about each recipient.
    blocks: list[Message] = []
    per_message = Message(policy=policy)
    envid = _ascii(_clean(envelope.envid or "", ID_LIMIT))
    if envid:
        # RFC 3464 2.2.1: the ENVID the sender gave, first in the per-message fields.
        _set(per_message, "Original-Envelope-Id", envid)
    _set(per_message, "Reporting-MTA", f"dns; {hostname}")
    queue_id = _ascii(_clean(envelope.id, ID_LIMIT))
    if queue_id:
        _set(per_message, "X-Mailhost-Queue-ID", queue_id)
    client = _ascii(_clean(envelope.client or "", HOST_LIMIT))
    if client:
        _set(per_message, "Received-From-MTA", f"dns; {client}")
    _set(per_message, "Arrival-Date", _date(envelope.arrival))
    blocks.append(per_message)

    human_lines: list[str] = []
    for recipient in recipients:
        address = _clean(recipient.address, ADDRESS_LIMIT) or "unknown"
        reply = _clean(recipient.last_reply or "", REPLY_LIMIT)
        remote = _clean(recipient.remote_mta or "", HOST_LIMIT)
        is_smtp = bool(_SMTP_REPLY.match(reply))

        block = Message(policy=policy)
        orcpt_type, _, orcpt = (recipient.orcpt or "").partition(";")
        orcpt = _ascii(_clean(orcpt, ADDRESS_LIMIT))
        if orcpt and re.fullmatch(r"[A-Za-z0-9-]{1,40}", orcpt_type):
            _set(block, "Original-Recipient", f"{orcpt_type}; {orcpt}")  # RFC 3464 2.3.1
        _set(block, "Final-Recipient", _typed_address(address))
        _set(block, "Action", action)
        _set(block, "Status", _status(recipient, reply, kind))
        if remote:
            _set(block, "Remote-MTA", f"dns; {_ascii(remote)}")
        if is_smtp:
            _set(block, "Diagnostic-Code", f"smtp; {_ascii(reply)}")
        if recipient.attempts > 0:
            _set(block, "Last-Attempt-Date", _date(now))
        if retry_until is not None:
            _set(block, "Will-Retry-Until", _date(retry_until))
        blocks.append(block)

        if kind == RELAYED:
            human_lines.append(f"<{address}>: relayed to {remote or 'the next host'}, which does not"
                               f" offer delivery notifications (RFC 3461)" + (f": {reply}" if reply else ""))
        elif kind == DELIVERED:
            human_lines.append(f"<{address}>: {reply or 'delivered to the mailbox'}")
        elif is_smtp and remote:
            human_lines.append(f"<{address}>: host {remote} said: {reply}")
        elif reply:
            human_lines.append(f"<{address}>: {reply}")
        elif kind == FAILURE:
            human_lines.append(f"<{address}>: delivery failed (no further details)")
        else:
            human_lines.append(f"<{address}>: delivery delayed (no further details)")

    # Part 1: for people.
    full = kind == FAILURE and envelope.ret == "FULL" and len(original) <= RETURN_FULL_LIMIT
    text = _human_text(
        envelope, human_lines, hostname=hostname, kind=kind, now=now, retry_until=retry_until, full=full
    )
    notification = MIMEPart(policy=policy)
    plain = text.isascii() and max(map(len, text.split("\n"))) <= _SOFT_LINE
    notification.set_content(
        text,
        subtype="plain",
        charset="us-ascii" if text.isascii() else "utf-8",
        cte="7bit" if plain else "quoted-printable",
    )
    notification["Content-Description"] = "Notification"

    report = MIMEPart(policy=policy)
    report["Content-Type"] = "message/delivery-status"
    report["Content-Description"] = "Delivery report"
    report.set_payload(blocks)

    # Part 3: what was sent.
    returned = MIMEPart(policy=policy)
    headers = _lf(original_headers(original))
    if full:
        # RFC 3461 4.3: the whole message. Parsed with compat32 and written back without
        # refolding, its lines come back as they were.
        returned["Content-Type"] = "message/rfc822"
        returned.set_payload([message_from_bytes(_lf(original), policy=compat32)])
    elif headers.isascii():
        returned.set_content(headers, "text", "rfc822-headers", cte="7bit")
    else:
        returned.set_content(
            headers.decode("utf-8", "replace"),
            subtype="rfc822-headers",
            charset="utf-8",
            cte="quoted-printable",
        )
    returned["Content-Description"] = (
        ("Undelivered Message" if full else "Undelivered Message Headers") if kind == FAILURE
        else "Delayed Message Headers" if kind == DELAY else "Message Headers"
    )

    message = EmailMessage(policy=policy)
    message["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    _set(message, "To", f"<{sender}>")
    message["Subject"] = {
        FAILURE: "Undelivered Mail Returned to Sender",
        DELAY: "Delayed Mail (still being retried)",
    }.get(kind, "Successful Mail Delivery Report")
    message["Date"] = _date(now)
    message["Message-ID"] = make_msgid(domain=hostname)
    message["Auto-Submitted"] = "auto-replied"
    message["MIME-Version"] = "1.0"
    message["Content-Type"] = "multipart/report; report-type=delivery-status"
    for part in (notification, report, returned):
        message.attach(part)

    out = io.BytesIO()
    # No boundary is set above: the generator picks one that no part contains.
    BytesGenerator(out, policy=policy).flatten(message)
    return out.getvalue()
