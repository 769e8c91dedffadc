"""Delivery status notifications (mailhost.feedback.dsn): every report is parsed back
with the stdlib `email` parser, the way a mail client or a bounce processor
reads it, and checked there."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest

from mailhost.feedback.dsn import REPLY_LIMIT, build_dsn
from mailhost.message import original_headers, received_count
from mailhost.queue.envelope import DEFERRED, FAILED, Envelope, Recipient

HOST = "mail.example.test"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 3 * 3600 + 120

ORIGINAL = (
    b"Received: from client.example.test ([192.0.2.7])\r\n"
    b"\tby mail.example.test with ESMTP id ABC123\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@remote.test>\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <q1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"Received: this line is in the body\r\n"
    b"the numbers are attached.\r\n"
)
ORIGINAL_HEADERS_LF = (
    b"Received: from client.example.test ([192.0.2.7])\n"
    b"\tby mail.example.test with ESMTP id ABC123\n"
    b"From: Alice <alice@example.test>\n"
    b"To: Bob <bob@remote.test>\n"
    b"Subject: Quarterly numbers\n"
    b"Message-ID: <q1@example.test>\n"
)

INJECTION = (
    "550 5.1.1 x\r\nBcc: victim@x\r\n\r\n--boundary\r\n"
    "Content-Type: text/html\r\n\r\n<a href=http://evil.test>click</a>\r\n--boundary--\r\n"
)


def rcpt(address: str = "bob@remote.test", **kw) -> Recipient:
    kw.setdefault("state", FAILED)
    kw.setdefault("attempts", 1)
    return Recipient(address, **kw)


def envelope(recipients: list[Recipient], **kw) -> Envelope:
    kw.setdefault("sender", "alice@example.test")
    kw.setdefault("arrival", ARRIVAL)
    kw.setdefault("next_attempt", ARRIVAL + 600)
    return Envelope(id=kw.pop("id", "0A1B2C3D"), recipients=recipients, **kw)


def build(recipients=None, original=ORIGINAL, *, kind="failure", env=None, **kw) -> bytes:
    if recipients is None:
        recipients = [
            rcpt(last_reply="550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
                 status="5.1.1", remote_mta="mx1.remote.test")
        ]
    if env is None:
        env = envelope(recipients)
    kw.setdefault("now", NOW)
    return build_dsn(env, recipients, original, hostname=HOST, kind=kind, **kw)


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(data: bytes):
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    found = list(msg.iter_parts())
    assert len(found) == 3
    return msg, found


def blocks(data: bytes):
    """The delivery-status part as (per-message fields, [per-recipient fields])."""
    _, (_, status, _) = parts(data)
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list) and len(payload) >= 2
    return payload[0], payload[1:]


def human(data: bytes) -> str:
    _, (text, _, _) = parts(data)
    assert text.get_content_type() == "text/plain"
    return text.get_content()


def all_headers(msg) -> list[tuple[str, str]]:
    """Every header field anywhere in the parsed tree, delivery-status blocks included."""
    found = list(msg.items())
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            found += all_headers(sub)
    return found


# --- the report's shape ------------------------------------------------------


def test_failure_report_shape_and_top_headers():
    data = build()
    msg, (text, status, returned) = parts(data)
    assert [p.get_content_type() for p in (text, status, returned)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@example.test"]
    assert b"\nTo: <alice@example.test>\n" in data
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith(f"@{HOST}>")
    assert msg["Date"].datetime == datetime.fromtimestamp(NOW, timezone.utc)
    assert msg.defects == [] and all(p.defects == [] for p in msg.walk())
    assert b"\r" not in data  # stored form: LF line endings
    assert data.isascii()


def test_message_ids_are_fresh():
    first, second = parse(build()), parse(build())
    assert first["Message-ID"] != second["Message-ID"]


def test_per_message_fields():
    env = envelope([rcpt()], client="client.example.test ([192.0.2.7])")
    per_message, _ = blocks(build(env.recipients, env=env))
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Mailhost-Queue-ID"] == "0A1B2C3D"
    assert per_message["Received-From-MTA"] == "dns; client.example.test ([192.0.2.7])"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert "Original-Envelope-Id" not in per_message  # no ENVID given


def test_per_message_fields_without_client():
    per_message, _ = blocks(build())
    assert "Received-From-MTA" not in per_message


# One row per recipient state: the Recipient as the queue holds it, the fields
# its block must have (None: must be absent), and what the human part says.
RECIPIENT_CASES = [
    pytest.param(
        dict(last_reply="550 5.1.1 <bob@remote.test>: User unknown", status="5.1.1",
             remote_mta="mx1.remote.test"),
        {"Final-Recipient": "rfc822; bob@remote.test", "Action": "failed", "Status": "5.1.1",
         "Remote-MTA": "dns; mx1.remote.test",
         "Diagnostic-Code": "smtp; 550 5.1.1 <bob@remote.test>: User unknown",
         "Last-Attempt-Date": "Wed, 15 Nov 2023 01:15:20 +0000", "Original-Recipient": None},
        "<bob@remote.test>: host mx1.remote.test said: 550 5.1.1 <bob@remote.test>: User unknown",
        id="remote-5xx-with-status",
    ),
    pytest.param(
        dict(last_reply="552-5.2.2 mailbox full\n552 5.2.2 try another day", remote_mta="mx2.remote.test"),
        {"Status": "5.2.2", "Diagnostic-Code": "smtp; 552-5.2.2 mailbox full 552 5.2.2 try another day"},
        "host mx2.remote.test said: 552-5.2.2 mailbox full 552 5.2.2 try another day",
        id="status-from-enhanced-code-multiline",
    ),
    pytest.param(
        dict(last_reply="550 no such user here", remote_mta="mx1.remote.test"),
        {"Status": "5.0.0", "Diagnostic-Code": "smtp; 550 no such user here"},
        "said: 550 no such user here",
        id="status-from-basic-5xx",
    ),
    pytest.param(
        dict(last_reply="451 try again later", remote_mta="mx1.remote.test", state=DEFERRED),
        {"Status": "4.0.0", "Diagnostic-Code": "smtp; 451 try again later"},
        "said: 451 try again later",
        id="status-from-basic-4xx",
    ),
    pytest.param(
        dict(last_reply="550 5.7.1 denied", status="not-a-status"),
        {"Status": "5.7.1", "Remote-MTA": None},
        "<bob@remote.test>: 550 5.7.1 denied",
        id="bad-status-ignored-no-remote",
    ),
    pytest.param(
        dict(last_reply="connect to mx1.remote.test[192.0.2.25]:25: Connection refused", status="4.4.1"),
        {"Status": "4.4.1", "Diagnostic-Code": None, "Remote-MTA": None},
        "<bob@remote.test>: connect to mx1.remote.test[192.0.2.25]:25: Connection refused",
        id="local-reason-no-diagnostic-code",
    ),
    pytest.param(
        dict(last_reply="", status="", attempts=0),
        {"Status": "5.0.0", "Diagnostic-Code": None, "Last-Attempt-Date": None},
        "<bob@remote.test>: delivery failed (no further details)",
        id="no-reply-never-attempted",
    ),
]


@pytest.mark.parametrize("fields, expected, said", RECIPIENT_CASES)
def test_recipient_block(fields, expected, said):
    data = build([rcpt(**fields)])
    _, (block,) = blocks(data)
    assert block["Final-Recipient"] == "rfc822; bob@remote.test"
    assert block["Action"] == "failed"
    for name, value in expected.items():
        if value is None:
            assert name not in block, name
        else:
            assert block[name] == value, name
    assert said in " ".join(human(data).split())


def test_recipient_blocks_in_order_and_field_order():
    recipients = [
        rcpt("a@remote.test", last_reply="550 5.1.1 a unknown", remote_mta="mx.remote.test"),
        rcpt("b@remote.test", last_reply="554 5.7.1 b refused", remote_mta="mx.remote.test"),
        rcpt("c@other.test", last_reply="no route to other.test", status="5.4.4"),
    ]
    _, found = blocks(build(recipients))
    assert [b["Final-Recipient"] for b in found] == [
        "rfc822; a@remote.test", "rfc822; b@remote.test", "rfc822; c@other.test",
    ]
    assert [b["Status"] for b in found] == ["5.1.1", "5.7.1", "5.4.4"]
    assert list(found[0].keys()) == [
        "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]


def test_human_part_wording():
    text = human(build())
    assert text.startswith(f"This is the mail system at host {HOST}.\n")
    assert "I'm sorry to have to inform you that your message could not" in text
    assert "Its headers are attached below." in text
    assert "please send mail to postmaster" in text
    assert "The mail system" in text
    assert all(len(line) <= 78 for line in text.split("\n"))


# --- part 3: what is returned -------------------------------------------------


def test_headers_part_holds_the_original_header_block():
    data = build([rcpt(last_reply="550 5.1.1 x")])
    _, (text, _, returned) = parts(data)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS_LF
    assert b"Hello Bob" not in data
    assert "Its headers are attached below." in text.get_content()


def test_headers_part_with_8bit_headers_is_quoted_printable():
    original = "Subject: Grüße aus Köln\nFrom: jörg@example.test\n\nbody\n".encode()
    data = build(original=original)
    assert data.isascii()
    _, (_, _, returned) = parts(data)
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned.get_content() == "Subject: Grüße aus Köln\nFrom: jörg@example.test\n"


# --- delay warnings ---------------------------------------------------------


def test_delay_warning():
    recipients = [rcpt(state=DEFERRED, last_reply="451 4.7.1 greylisted, try later", status="4.7.1",
                       remote_mta="mx1.remote.test", attempts=3)]
    until = ARRIVAL + 5 * 86400
    data = build(recipients, kind="delay", retry_until=until)
    msg, _ = parts(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, (block,) = blocks(data)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    text = human(data)
    words = " ".join(text.split())
    assert "THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE." in text
    assert "Your message could not be delivered for more than 3 hour(s)." in text
    assert "It will be retried until it is 5 day(s) old." in text
    assert "host mx1.remote.test said: 451 4.7.1 greylisted, try later" in words


def test_delay_warning_without_retry_until():
    data = build([rcpt(state=DEFERRED, last_reply="")], kind="delay")
    _, (block,) = blocks(data)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.0.0"
    assert "Will-Retry-Until" not in block
    assert "retried until" not in human(data)


# --- non-ASCII addresses -------------------------------------------------------


def test_non_ascii_recipient_uses_utf8_address_type():
    recipients = [rcpt("jörg+list@bücher.test", last_reply="550 5.1.1 unknown", remote_mta="mx.bücher.test")]
    data = build(recipients)
    assert data.isascii()  # the report stays 7-bit: RFC 6533 xtext, QP for people
    _, (block,) = blocks(data)
    assert block["Final-Recipient"] == r"utf-8; j\x{F6}rg\x{2B}list@b\x{FC}cher.test"
    assert block["Remote-MTA"] == "dns; mx.b?cher.test"
    assert "<jörg+list@bücher.test>: host mx.bücher.test said: 550 5.1.1 unknown" in human(data)


def test_non_ascii_sender_goes_in_to_as_utf8():
    env = envelope([rcpt(last_reply="550 5.1.1 x")], sender="jörg@bücher.test")
    data = build(env.recipients, env=env)
    msg, _ = parts(data)
    # email's bytes parser keeps raw 8-bit header octets as surrogate escapes
    to = msg["To"].addresses[0].addr_spec.encode("ascii", "surrogateescape").decode("utf-8")
    assert to == "jörg@bücher.test"
    assert "To: <jörg@bücher.test>\n".encode() in data


# --- hostile text -----------------------------------------------------------------


def test_reply_cannot_inject_headers_or_parts():
    recipients = [rcpt(last_reply=INJECTION, remote_mta="mx.evil.test")]
    data = build(recipients)
    msg, found = parts(data)  # exactly 3 parts
    assert msg.get_boundary() != "boundary"
    names = [name.lower() for name, _ in all_headers(msg)]
    assert "bcc" not in names
    assert names.count("content-type") == 4  # the report and its three parts
    assert all(p.defects == [] for p in msg.walk())
    _, (block,) = blocks(data)
    diag = block["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 5.1.1 x Bcc: victim@x --boundary Content-Type: text/html")
    assert "\r" not in diag and "\n" not in diag
    assert "Bcc: victim@x" in " ".join(human(data).split())
    assert b"\nBcc:" not in data and b"\n--boundary" not in data


# Each row puts hostile text in one field that comes from outside.
HOSTILE = "x\r\nBcc: victim@x\r\n\r\n--b\x00\x0b\x0c\x1b[31m\x7f\x85\u2028\u2029\u202e\ud800y"


@pytest.mark.parametrize(
    "where",
    ["last_reply", "remote_mta", "address", "status", "sender", "id", "client"],
)
def test_hostile_text_in_any_field_stays_inside_it(where):
    fields = dict(last_reply="550 5.1.1 unknown " + HOSTILE if where == "last_reply" else "550 5.1.1 unknown")
    if where in ("remote_mta", "status"):
        fields[where] = HOSTILE
    recipient = rcpt("bob" + HOSTILE + "@remote.test" if where == "address" else "bob@remote.test", **fields)
    env_fields = {}
    if where in ("sender", "id", "client"):
        env_fields[where] = "alice" + HOSTILE + "@example.test" if where == "sender" else HOSTILE
    env = envelope([recipient], **env_fields)
    data = build([recipient], env=env)
    msg, _ = parts(data)
    names = [name.lower() for name, _ in all_headers(msg)]
    assert "bcc" not in names
    per_message, (block,) = blocks(data)
    assert block["Action"] == "failed"
    for line in data.split(b"\n"):
        assert not any(c < 0x20 and c != 0x09 for c in line), line
        assert b"\x7f" not in line and len(line) <= 998
    assert data.isascii()


@pytest.mark.parametrize("spaces", [True, False], ids=["words", "one-word"])
def test_huge_reply_is_capped_and_folded(spaces):
    chunk = "overlong " if spaces else "A"
    reply = "550 5.1.1 " + chunk * (200_000 // len(chunk))
    data = build([rcpt(last_reply=reply, remote_mta="mx.remote.test")])
    assert len(data) < 12_000
    _, (block,) = blocks(data)
    diag = block["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 5.1.1 ")
    assert len(diag) <= len("smtp; ") + REPLY_LIMIT + 2  # +2: a space at a forced cut
    assert diag.endswith("...")
    lines = data.split(b"\n")
    assert max(map(len, lines)) <= 998
    status = data[data.index(b"Content-Type: message/delivery-status"):data.index(b"Content-Type: text/rfc822")]
    if spaces:  # breakable at spaces: every line within the 78 columns
        assert max(map(len, status.split(b"\n"))) <= 78
    text = " ".join(human(data).split())
    assert "550 5.1.1 " in text and "..." in text


# --- refusals -------------------------------------------------------------------


def test_no_dsn_for_the_null_sender():
    env = envelope([rcpt(last_reply="550 5.1.1 x")], sender="")
    with pytest.raises(ValueError, match="null sender"):
        build(env.recipients, env=env)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="bounce"), "kind"),
        (dict(kind="failure", retry_until=ARRIVAL + 86400), "retry_until"),
        (dict(recipients=[]), "recipient"),
        (dict(hostname="bad host\r\nBcc: x"), "host name"),
        (dict(hostname=""), "host name"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    recipients = kwargs.pop("recipients", [rcpt(last_reply="550 5.1.1 x")])
    hostname = kwargs.pop("hostname", HOST)
    with pytest.raises(ValueError, match=message):
        kwargs.setdefault("kind", "failure")
        build_dsn(envelope(recipients or [rcpt()]), recipients, ORIGINAL, hostname=hostname, now=NOW, **kwargs)


def test_long_non_ascii_sender_keeps_lines_within_998_octets():
    sender = "ö" * 600 + "@example.test"  # 1200+ octets in one word
    env = envelope([rcpt(last_reply="550 5.1.1 x")], sender=sender)
    data = build(env.recipients, env=env)
    parts(data)
    assert max(map(len, data.split(b"\n"))) <= 998


# --- helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, headers",
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\nB: 2\n\nbody\n\nmore\n", b"A: 1\nB: 2\n"),
        (b"A: 1\n  folded\n\tagain\nB: 2\n\nbody\n", b"A: 1\n  folded\n\tagain\nB: 2\n"),
        (b"A: 1\nB: 2\n", b"A: 1\nB: 2\n"),  # all headers, no body
        (b"A: 1\nB: 2", b"A: 1\nB: 2"),  # ... and no final newline
        (b"A: 1\nnot a header line\nC: 3\n", b"A: 1\n"),  # no empty line: ends where email's parser ends it
        (b"\nbody only\n", b""),
        (b"", b""),
        (b" starts folded\n\nbody\n", b""),
        (b"Received : obsolete\n\nb\n", b"Received : obsolete\n"),
    ],
)
def test_original_headers(message, headers):
    assert original_headers(message) == headers


@pytest.mark.parametrize(
    "message, count",
    [
        (ORIGINAL, 1),
        (b"Received: a\nreceived: b\nRECEIVED: c\nReceived :d\n\nReceived: body\n", 4),
        (b"X-Received: a\nReceived-SPF: pass\nSubject: Received: x\n  Received: folded\n\n", 0),
        (b"".join(b"Received: from hop%d\n\tby x\n" % i for i in range(51)) + b"\nbody\n", 51),
        (b"Subject: none\r\n\r\nReceived: a\r\n", 0),
        (b"", 0),
    ],
)
def test_received_count(message, count):
    assert received_count(message) == count


@pytest.mark.parametrize("value", ["ö" * 700, "a" * 2500, "word " * 400, "x " + "é" * 600 + " y"])
def test_fold_limits(value):
    """The folder behind every field we write: 78 columns at spaces, 998 octets always."""
    from mailhost.feedback.dsn import _fold

    folded = "To: " + _fold("To", value.strip())
    lines = folded.split("\n")
    assert max(len(line.encode()) for line in lines) <= 998
    assert all(line.startswith(" ") for line in lines[1:])
    if " " in value.strip():
        assert all(len(line.encode()) <= 78 or " " not in line.strip() for line in lines)
    assert "".join(folded[4:].split()) == "".join(value.split())  # nothing lost


@pytest.mark.parametrize(
    "message, looped",
    [
        (b"".join(b"Received: from hop%d\n" % i for i in range(50)) + b"\nbody\n", False),
        (b"".join(b"Received: from hop%d\n" % i for i in range(51)) + b"\nbody\n", True),
        (b"".join(b"RECEIVED : hop%d\r\n" % i for i in range(51)) + b"\r\nbody\r\n", True),
        (b"Subject: " + b"received " * 60 + b"\n\nbody\n", False),  # the word, not the field
        (b"Subject: x\n\n" + b"Received: in the body\n" * 60, False),
        (b"Subject: x\r\n\r\n" + b"Received: in the body\r\n" * 60, False),
    ],
)
def test_too_many_hops_agrees_with_the_count(message, looped):
    from mailhost.intake.cleanup import too_many_hops

    assert too_many_hops(message) is looped


# --- RFC 3461: ENVID, ORCPT, RET, and the success reports -----------------------------


def test_envid_and_orcpt_become_original_fields():
    env = envelope([rcpt(last_reply="550 5.1.1 x", orcpt="rfc822;Bob+tag@remote.test")], envid="QQ 314\r\nBcc: x")
    per_message, [block] = blocks(build(env.recipients, env=env))
    assert per_message["Original-Envelope-Id"] == "QQ 314 Bcc: x"  # cleaned: one line
    assert block["Original-Recipient"] == "rfc822; Bob+tag@remote.test"
    assert list(block.keys())[:2] == ["Original-Recipient", "Final-Recipient"]  # RFC 3464 2.3 order


def test_ret_full_returns_the_whole_message_in_a_failure_report():
    env = envelope([rcpt(last_reply="550 5.1.1 x")], ret="FULL")
    data = build(env.recipients, env=env)
    _, (_, _, returned) = parts(data)
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Subject"] == "Quarterly numbers"
    assert "the numbers are attached." in inner.get_content()


@pytest.mark.parametrize("ret, kind, original", [
    ("HDRS", "failure", ORIGINAL),
    (None, "failure", ORIGINAL),
    ("FULL", "delay", ORIGINAL),  # RFC 3461 4.3: RET is about failed reports
    ("FULL", "failure", ORIGINAL + b"x" * 60000),  # over RETURN_FULL_LIMIT
])
def test_other_reports_return_the_headers_only(ret, kind, original):
    recipients = [rcpt(last_reply="451 4.7.1 later", state=DEFERRED)] if kind == "delay" else None
    env = envelope(recipients or [rcpt(last_reply="550 5.1.1 x")], ret=ret)
    _, (_, _, returned) = parts(build(env.recipients, original, env=env, kind=kind))
    assert returned.get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize("kind, action, said", [
    ("delivered", "delivered", "delivered to the mailbox"),
    ("relayed", "relayed", "does not offer delivery notifications"),
])
def test_success_reports(kind, action, said):
    recipient = rcpt(state="delivered", status="", last_reply="delivered to the mailbox" if kind == "delivered"
                     else "250 2.0.0 Ok: queued", remote_mta="" if kind == "delivered" else "mx1.remote.test")
    data = build([recipient], kind=kind)
    assert parse(data)["Subject"] == "Successful Mail Delivery Report"
    _, [block] = blocks(data)
    assert block["Action"] == action and block["Status"] == "2.0.0"
    assert said in " ".join(human(data).split())
