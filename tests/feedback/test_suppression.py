"""Bounce processing (mailhost.feedback.suppression): VERP return paths, reading
delivery status notifications from real MTAs and our own, and the
suppression list file the daemon and the command line share."""

from __future__ import annotations

import email
import email.policy
import json
import re
import stat
import threading
from pathlib import Path

import pytest

from mailhost.feedback.dsn import build_dsn
from mailhost.queue.envelope import FAILED, Envelope, Recipient
from mailhost.config import BounceRule
from mailhost.feedback.suppression import (
    BounceReport,
    SuppressionError,
    SuppressionList,
    address_key,
    parse_dsn,
    verp_recipient,
    verp_sender,
)

BOUNCE_DOMAIN = "bounce.example.test"
DAY = 86400.0
T0 = 1_700_000_000.0

# RFC 5322 3.2.3 dot-atom, the shape every VERP local part must have.
DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*$")


def local_of(address: str) -> str:
    return address.rpartition("@")[0]


# ---------------------------------------------------------------------------
# VERP


@pytest.mark.parametrize("recipient", [
    "bob@example.com",
    "Bob.Smith@Example.COM",
    "bob+news@example.com",
    "bob+news+2024@example.com",
    "x=y@example.com",
    "o'brien@example.ie",
    "a-b_c.d@sub.example.co.uk",
    "weird!#$%&*/?^`{|}~@example.com",
    '"john doe"@example.com',
    '"a..b"@example.com',
    '"quoted\\"inner"@example.com',
    "user@[192.0.2.1]",
    "postmaster",
    "用户@例子.广告",
    "josé@exämple.test",
    "a" * 56 + "@example.com",  # readable form too long; base32 too long: hashed
    "a" * 40 + "@" + "b" * 40 + ".example.com",
    "é" * 30 + "@example.com",
])
def test_verp_round_trip_gives_a_valid_local_part(recipient):
    sender = verp_sender(BOUNCE_DOMAIN, recipient)
    local, _, domain = sender.rpartition("@")
    assert domain == BOUNCE_DOMAIN
    assert local.startswith("bounces+")
    assert DOT_ATOM.match(local), local
    assert len(local.encode("utf-8")) <= 64
    # Hashed forms come back from the addresses the report names.
    assert verp_recipient(local, ["someone@else.test", recipient]) == recipient


@pytest.mark.parametrize("recipient, local", [
    ("bob@example.com", "bounces+bob=example.com"),
    ("bob+news@example.com", "bounces+bob+2bnews=example.com"),
    ("x=y@example.com", "bounces+x+3dy=example.com"),
])
def test_verp_readable_form_is_classic_verp(recipient, local):
    assert verp_sender(BOUNCE_DOMAIN, recipient) == f"{local}@{BOUNCE_DOMAIN}"
    assert verp_recipient(local) == recipient


def test_verp_readable_and_base32_forms_survive_a_relay_that_changes_case():
    for recipient in ("bob+news@example.com", '"john doe"@example.com', "用户@例子.广告"):
        local = local_of(verp_sender(BOUNCE_DOMAIN, recipient))
        for changed in (local.upper(), local.lower()):
            assert address_key(verp_recipient(changed)) == address_key(recipient)


def test_verp_hashed_form_needs_the_reported_address():
    recipient = "a" * 60 + "@example.com"
    local = local_of(verp_sender(BOUNCE_DOMAIN, recipient))
    assert verp_recipient(local) is None
    assert verp_recipient(local, ["other@example.com"]) is None
    # The report may spell it in another case; the candidate comes back as given.
    assert verp_recipient(local, [recipient.upper()]) == recipient.upper()


@pytest.mark.parametrize("local", [
    "",
    "bob",
    "bounces",
    "bounce+bob=example.com",
    "bounces+",
    "bounces+bob",  # no "="
    "bounces+bob=",  # no domain
    "bounces+=example.com",  # "=" form that is not base32
    "bounces+a=b=c",  # two "=": not something we wrote
    "bounces+bob+zz=example.com",  # "+" that is not an escape
    "bounces+bob+2=example.com",
    "bounces+.bob=example.com",  # not a dot-atom
    "bounces+bob=-example.com",  # not a host name
    "bounces+=mzxw7",  # base32 with stray trailing bits ("foo" is mzxw6)
    "bounces+=77777777",  # base32 of bytes that are not UTF-8
    "bounces+=ae",  # base32 of a control character
    "bounces+=0abc",  # hash of the wrong length
    "bounces+=0" + "a" * 26,  # hash, no candidates
    "bounces+" + "a" * 60 + "=example.com",  # longer than a local part may be
])
def test_verp_recipient_refuses_what_is_not_ours(local):
    assert verp_recipient(local) is None


def test_verp_recipient_refuses_non_strings():
    assert verp_recipient(None) is None  # type: ignore[arg-type]
    assert verp_recipient(b"bounces+bob=example.com") is None  # type: ignore[arg-type]


@pytest.mark.parametrize("domain", ["", "bad domain", "a@b", "-x.test", "例子.广告"])
def test_verp_sender_refuses_a_bad_bounce_domain(domain):
    with pytest.raises(ValueError):
        verp_sender(domain, "bob@example.com")


@pytest.mark.parametrize("recipient", ["", "bob\r\n@example.com", "bob\x00@example.com"])
def test_verp_sender_refuses_a_recipient_it_could_not_give_back(recipient):
    with pytest.raises(ValueError):
        verp_sender(BOUNCE_DOMAIN, recipient)


# ---------------------------------------------------------------------------
# Reading reports

ORIGINAL = (
    b"From: News <news@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: Our news\r\n"
    b"Message-ID: <n1@example.test>\r\n"
    b"\r\n"
    b"Hello\r\n"
)


def own_dsn(recipients: list[Recipient], *, kind: str = "failure", sender: str | None = None, **kw) -> bytes:
    envelope = Envelope(
        id="0A1B2C3D",
        sender=sender or verp_sender(BOUNCE_DOMAIN, recipients[0].address),
        recipients=recipients,
        arrival=T0,
        next_attempt=T0 + 600,
        **kw,
    )
    return build_dsn(envelope, recipients, ORIGINAL, hostname="mail.example.test", kind=kind, now=T0 + 3600)


POSTFIX_BOUNCE = b"""\
Return-Path: <>
Received: by mx.remote.test (Postfix)
\tid 4XyZ1234; Tue, 14 Nov 2023 22:13:20 +0000 (UTC)
Date: Tue, 14 Nov 2023 22:13:20 +0000 (UTC)
From: MAILER-DAEMON@mx.remote.test (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounces+carol=remote.test@bounce.example.test
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4XyZ1234.1700000000/mx.remote.test"
Message-Id: <20231114221320.4XyZ1234@mx.remote.test>

This is a MIME-encapsulated message.

--4XyZ1234.1700000000/mx.remote.test
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.remote.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<carol@remote.test>: host mailstore.remote.test[10.0.0.5] said: 550 5.1.1
    <carol@remote.test>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

<dave@remote.test>: host mailstore.remote.test[10.0.0.5] said: 452 4.2.2
    Mailbox full (in reply to RCPT TO command)

--4XyZ1234.1700000000/mx.remote.test
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.remote.test
X-Postfix-Queue-ID: 4XyZ1234
X-Postfix-Sender: rfc822; bounces+carol=remote.test@bounce.example.test
Arrival-Date: Tue, 14 Nov 2023 22:10:00 +0000 (UTC)

Final-Recipient: rfc822; carol@remote.test
Original-Recipient: rfc822;Carol@remote.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mailstore.remote.test
Diagnostic-Code: smtp; 550 5.1.1 <carol@remote.test>: Recipient address
    rejected: User unknown in virtual mailbox table

Final-Recipient: rfc822; dave@remote.test
Action: failed
Status: 4.2.2
Remote-MTA: dns; mailstore.remote.test
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full

Final-Recipient: rfc822; erin@remote.test
Action: delivered
Status: 2.0.0

--4XyZ1234.1700000000/mx.remote.test
Content-Description: Undelivered Message
Content-Type: message/rfc822

From: News <news@example.test>
To: carol@remote.test
Subject: Our news

Hello
--4XyZ1234.1700000000/mx.remote.test--
""".replace(b"\n", b"\r\n")

GMAIL_DELAY = b"""\
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: bounces+frank=gmail.com@bounce.example.test
Subject: Delivery Status Notification (Delay)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000abcd"; report-type=delivery-status

--000000000000abcd
Content-Type: text/plain; charset="UTF-8"

Delivery incomplete. There was a temporary problem delivering your message.

--000000000000abcd
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Arrival-Date: Tue, 14 Nov 2023 14:13:20 -0800 (PST)

Final-Recipient: rfc822; <frank@gmail.com>
Action: delayed
Status: 4.7.28 (temporary failure)
Diagnostic-Code: smtp; 421-4.7.28 Our system has detected an unusual rate of
 unsolicited mail originating from your IP address.
Will-Retry-Until: Fri, 17 Nov 2023 14:13:20 -0800 (PST)

--000000000000abcd--
"""

EXCHANGE_BASE64 = b"""\
From: postmaster@outlook.com
To: bounces+gina=outlook.com@bounce.example.test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
 boundary="b1"

--b1
Content-Type: text/plain; charset=us-ascii

Delivery has failed to these recipients or groups.
--b1
Content-Type: message/delivery-status
Content-Transfer-Encoding: base64

""" + __import__("base64").encodebytes(
    b"Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.outlook.com\r\n\r\n"
    b"Final-Recipient: rfc822;gina@outlook.com\r\n"
    b"Action: failed\r\nStatus: 5.2.2\r\n"
    b"Diagnostic-Code: smtp;554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException\r\n"
) + b"""
--b1--
"""


def test_parse_our_own_dsn():
    recipient = Recipient(
        "bob@remote.test", state=FAILED, attempts=1, status="5.1.1", remote_mta="mx1.remote.test",
        last_reply="550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
    )
    assert parse_dsn(own_dsn([recipient])) == [
        BounceReport(
            recipient="bob@remote.test",
            status="5.1.1",
            action="failed",
            diagnostic="550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
            permanent=True,
        )
    ]


def test_parse_our_own_dsn_with_several_recipients_and_utf8_addresses():
    recipients = [
        Recipient("用户@例子.广告", state=FAILED, attempts=1, status="5.1.1", last_reply="550 5.1.1 no"),
        Recipient("a+b=c@remote.test", state=FAILED, attempts=2, status="5.2.1",
                  last_reply="550 5.2.1 disabled"),
        Recipient("late@remote.test", state=FAILED, attempts=9, status="4.4.7", last_reply=""),
    ]
    reports = parse_dsn(own_dsn(recipients, smtputf8=True))
    assert [(r.recipient, r.status, r.permanent, r.original_recipient) for r in reports] == [
        ("用户@例子.广告", "5.1.1", True, ""),
        ("a+b=c@remote.test", "5.2.1", True, ""),
        ("late@remote.test", "4.4.7", False, ""),  # failed, but not with a 5.x.x: soft
    ]


def test_parse_our_own_delay_warning_is_not_permanent():
    recipient = Recipient("bob@remote.test", state="deferred", attempts=3, status="4.4.1",
                          last_reply="451 4.4.1 try later", remote_mta="mx1.remote.test")
    envelope_sender = verp_sender(BOUNCE_DOMAIN, "bob@remote.test")
    data = own_dsn([recipient], kind="delay", sender=envelope_sender)
    [report] = parse_dsn(data)
    assert (report.action, report.status, report.permanent) == ("delayed", "4.4.1", False)


def test_parse_postfix_bounce():
    reports = parse_dsn(POSTFIX_BOUNCE)
    assert reports == [
        BounceReport(
            recipient="carol@remote.test",
            status="5.1.1",
            action="failed",
            diagnostic="550 5.1.1 <carol@remote.test>: Recipient address rejected: "
                       "User unknown in virtual mailbox table",
            permanent=True,
            original_recipient="Carol@remote.test",
        ),
        BounceReport(
            recipient="dave@remote.test",
            status="4.2.2",
            action="failed",
            diagnostic="452 4.2.2 Mailbox full",
            permanent=False,
        ),
    ]  # erin (Action: delivered) is not a bounce


def test_parse_gmail_delay():
    [report] = parse_dsn(GMAIL_DELAY)
    assert report.recipient == "frank@gmail.com"  # angle brackets dropped
    assert report.status == "4.7.28"  # the comment after it dropped
    assert report.action == "delayed"
    assert not report.permanent
    assert report.diagnostic.startswith("421-4.7.28 Our system has detected an unusual rate of unsolicited")


def test_parse_base64_encoded_status_part():
    [report] = parse_dsn(EXCHANGE_BASE64)
    assert (report.recipient, report.status, report.permanent) == ("gina@outlook.com", "5.2.2", True)
    assert "QuotaExceededException" in report.diagnostic


def report_with(status_part: bytes, *, report_type: bytes = b"delivery-status",
                part_type: bytes = b"message/delivery-status") -> bytes:
    return (
        b"From: MAILER-DAEMON@x.test\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/report; report-type=" + report_type + b"; boundary=\"B\"\n\n"
        b"--B\nContent-Type: text/plain\n\nhi\n"
        b"--B\nContent-Type: " + part_type + b"\n\n" + status_part + b"\n--B--\n"
    )


def test_parse_global_delivery_status_with_raw_utf8():
    data = report_with(
        "Reporting-MTA: dns; x.test\n\nFinal-Recipient: utf-8; josé@exämple.test\n"
        "Action: failed\nStatus: 5.1.1\n".encode(),
        report_type=b"global-delivery-status", part_type=b"message/global-delivery-status",
    )
    assert [r.recipient for r in parse_dsn(data)] == ["josé@exämple.test"]


def test_parse_keeps_one_report_per_address():
    block = b"Final-Recipient: rfc822; a@x.test\nAction: failed\nStatus: 5.1.1\n"
    data = report_with(b"Reporting-MTA: dns; x.test\n\n" + block + b"\n" + block.replace(b"a@", b"A@"))
    assert len(parse_dsn(data)) == 1


JUNK_CASES = {
    "empty": b"",
    "plain mail": ORIGINAL,
    "random bytes": bytes(range(256)) * 8,
    "only headers": b"Content-Type: multipart/report; report-type=delivery-status\n",
    "no boundary": b"Content-Type: multipart/report; report-type=delivery-status\n\nbody\n",
    "mixed, not report": report_with(b"").replace(b"multipart/report", b"multipart/mixed"),
    "feedback report": report_with(
        b"Feedback-Type: abuse\nFinal-Recipient: rfc822; a@x.test\nAction: failed\nStatus: 5.1.1\n",
        report_type=b"feedback-report"),
    "status part as text": report_with(
        b"Final-Recipient: rfc822; a@x.test\nAction: failed\nStatus: 5.1.1\n", part_type=b"text/plain"),
    "action delivered": report_with(b"Final-Recipient: rfc822; a@x.test\nAction: delivered\nStatus: 2.0.0\n"),
    "no action": report_with(b"Final-Recipient: rfc822; a@x.test\nStatus: 5.1.1\n"),
    "no recipient": report_with(b"Action: failed\nStatus: 5.1.1\n"),
    "x400 recipient": report_with(b"Final-Recipient: x400; /C=US/O=Ex/\nAction: failed\nStatus: 5.1.1\n"),
    "not an address": report_with(b"Final-Recipient: rfc822; not an address\nAction: failed\nStatus: 5.1.1\n"),
    "control in address": report_with(b"Final-Recipient: rfc822; a\x01b@x.test\nAction: failed\nStatus: 5.1.1\n"),
    "xtext out of range": report_with(b"Final-Recipient: utf-8; a\\x{110000}@x.test\nAction: failed\nStatus: 5.1.1\n"),
    "xtext surrogate": report_with(b"Final-Recipient: utf-8; a\\x{D800}@x.test\nAction: failed\nStatus: 5.1.1\n"),
    "bad base64": report_with(b"!!!!").replace(
        b"message/delivery-status\n", b"message/delivery-status\nContent-Transfer-Encoding: base64\n"),
    "deep nesting": b"Content-Type: multipart/report; boundary=b0\n\n" + b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(3000)),
}


@pytest.mark.parametrize("data", JUNK_CASES.values(), ids=JUNK_CASES.keys())
def test_parse_gives_nothing_for_junk(data):
    assert parse_dsn(data) == []


def test_parse_unreadable_status_is_soft():
    data = report_with(b"Final-Recipient: rfc822; a@x.test\nAction: failed\nStatus: 5.1\n")
    [report] = parse_dsn(data)
    assert (report.status, report.permanent) == ("", False)


def test_parse_never_raises_on_truncated_or_mangled_reports():
    recipient = Recipient("bob@remote.test", state=FAILED, attempts=1, status="5.1.1", last_reply="550 5.1.1 no")
    samples = [own_dsn([recipient]), POSTFIX_BOUNCE, GMAIL_DELAY, EXCHANGE_BASE64]
    for data in samples:
        whole = parse_dsn(data)
        for cut in range(0, len(data), 7):
            # Never an address cut short (it could be someone else's): what is there is what the whole says.
            assert set(parse_dsn(data[:cut])) <= set(whole)
        # Bytes flipped through the status part: still a list, never an exception.
        start = data.find(b"Final-Recipient")
        for i in range(start, min(len(data), start + 200), 5):
            mangled = data[:i] + b"\x00\xff\n\n--" + data[i + 3 :]
            assert isinstance(parse_dsn(mangled), list)


def test_parse_caps_the_number_of_reports():
    blocks = b"\n".join(
        b"Final-Recipient: rfc822; u%d@x.test\nAction: failed\nStatus: 5.1.1\n" % i for i in range(1500)
    )
    assert len(parse_dsn(report_with(blocks))) == 1000


# ---------------------------------------------------------------------------
# The suppression list


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "suppression.json"


def bounce(address: str, status: str = "5.1.1", action: str = "failed", diagnostic: str = "550 no") -> BounceReport:
    return BounceReport(address, status, action, diagnostic, action == "failed" and status.startswith("5"))


def test_add_lookup_remove_and_persist(path):
    first = SuppressionList(path)
    first.add("Bob@Example.COM", "5.1.1", "user unknown", now=T0)
    first.add("<carol@example.com.>", "", "asked us to stop", source="complaint", now=T0 + 1)

    again = SuppressionList(path)  # a fresh process reads the file
    entry = again.is_suppressed("bob@example.com")
    assert entry is not None
    assert (entry.address, entry.status, entry.reason, entry.source) == (
        "bob@example.com", "5.1.1", "user unknown", "manual")
    assert entry.date == "2023-11-14T22:13:20+00:00"
    assert again.is_suppressed("BOB@example.com.") == entry
    assert again.is_suppressed("carol@example.com").source == "complaint"
    assert again.is_suppressed("dave@example.com") is None
    assert [e.address for e in again.entries()] == ["bob@example.com", "carol@example.com"]

    assert again.remove("BOB@example.com") is True
    assert again.remove("bob@example.com") is False
    assert SuppressionList(path).is_suppressed("bob@example.com") is None


def test_file_is_private_and_json(path):
    SuppressionList(path).add("bob@example.com", "5.1.1", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("suppression.json.lock").stat().st_mode) == 0o600
    data = json.loads(path.read_bytes())
    assert data["version"] == 1 and "bob@example.com" in data["suppressed"]


def test_missing_file_is_an_empty_list(path):
    assert SuppressionList(path).entries() == []
    assert not path.exists()  # reading creates nothing


@pytest.mark.parametrize("address, status", [
    ("", "5.1.1"),
    ("bob", "5.1.1"),
    ("@example.com", "5.1.1"),
    ("bob@", "5.1.1"),
    ("bob smith@example.com", "5.1.1"),
    ("bob@exa mple.com", "5.1.1"),
    ("bob\n@example.com", "5.1.1"),
    ("bob@example.com", "550"),
    ("bob@example.com", "3.1.1"),
])
def test_add_refuses_bad_input(path, address, status):
    with pytest.raises(ValueError):
        SuppressionList(path).add(address, status, "x")


def test_add_takes_quoted_and_utf8_addresses(path):
    suppression = SuppressionList(path)
    suppression.add('"john doe"@example.com', "5.1.1", "x")
    suppression.add("用户@例子.广告", "5.1.1", "x")
    again = SuppressionList(path)
    assert again.is_suppressed('"John Doe"@example.com') is not None
    assert again.is_suppressed("用户@例子.广告") is not None


def test_reason_is_one_clean_line(path):
    suppression = SuppressionList(path)
    suppression.add("bob@example.com", "5.1.1", "line one\r\nBcc: x\t\x00 " + "y" * 2000)
    reason = suppression.is_suppressed("bob@example.com").reason
    assert "\n" not in reason and "\r" not in reason and "\x00" not in reason
    assert reason.startswith("line one Bcc: x") and len(reason) <= 1000


def test_permanent_bounce_suppresses_at_once(path):
    suppression = SuppressionList(path)
    assert suppression.record_bounce(bounce("bob@example.com", diagnostic="550 5.1.1 no such user"), now=T0)
    entry = SuppressionList(path).is_suppressed("bob@example.com")
    assert (entry.status, entry.reason, entry.source) == ("5.1.1", "550 5.1.1 no such user", "bounce")


def test_soft_bounces_suppress_after_the_limit_within_the_window(path):
    suppression = SuppressionList(path, soft_limit=3, soft_window=7 * DAY)
    assert not suppression.record_bounce(bounce("bob@example.com", "4.2.2"), now=T0)
    assert not suppression.record_bounce(bounce("bob@example.com", "4.2.2", "delayed", "452 over quota"), now=T0 + DAY)
    assert suppression.soft_count("bob@example.com", now=T0 + DAY) == 2
    assert suppression.is_suppressed("bob@example.com") is None
    # A new instance (a daemon restart) keeps counting from the file.
    assert SuppressionList(path, soft_limit=3).record_bounce(
        bounce("Bob@example.com", "4.2.2", diagnostic="452 4.2.2 full"), now=T0 + 2 * DAY)
    entry = SuppressionList(path).is_suppressed("bob@example.com")
    assert entry.status == "4.2.2" and entry.source == "bounce"
    assert entry.reason == "3 soft bounces in 7 days; last: 452 4.2.2 full"
    assert "bob@example.com" not in json.loads(path.read_bytes())["soft"]


def test_soft_bounces_spread_beyond_the_window_do_not_suppress(path):
    suppression = SuppressionList(path, soft_limit=3, soft_window=7 * DAY)
    for day in (0, 4, 8, 12, 16, 20):
        assert not suppression.record_bounce(bounce("bob@example.com", "4.2.2"), now=T0 + day * DAY)
    assert suppression.is_suppressed("bob@example.com") is None
    # Old counts are dropped from the file, for every address.
    suppression.record_bounce(bounce("carol@example.com", "4.2.2"), now=T0 + 40 * DAY)
    assert list(json.loads(path.read_bytes())["soft"]) == ["carol@example.com"]


def test_failures_that_say_nothing_against_the_address_never_count(path):
    # Expired in someone's queue, no readable status, a block of the sender: no soft bounce either.
    suppression = SuppressionList(path, soft_limit=1)
    assert not suppression.record_bounce(bounce("bob@example.com", "4.4.7", diagnostic=""), now=T0)
    assert not suppression.record_bounce(bounce("carol@example.com", "", diagnostic=""), now=T0)
    assert not suppression.record_bounce(bounce("dave@example.com", "5.7.26", diagnostic="550 5.7.26 DMARC"), now=T0)
    assert suppression.entries() == [] and suppression.soft_count("bob@example.com", now=T0) == 0


def test_a_temporary_unknown_user_is_soft_and_the_entry_keeps_its_class(path):
    suppression = SuppressionList(path, soft_limit=2)
    assert not suppression.record_bounce(bounce("bob@example.com", "4.1.1", "delayed", "450 4.1.1 user unknown"), now=T0)
    assert suppression.record_bounce(bounce("bob@example.com", "4.1.1", "delayed", "450 4.1.1 user unknown"), now=T0 + 1)
    entry = SuppressionList(path).is_suppressed("bob@example.com")
    assert (entry.category, entry.reason) == ("invalid_recipient", "2 soft bounces in 7 days; last: 450 4.1.1 user unknown")


def test_a_bounce_rule_decides_before_the_built_in_ones(path):
    rule = BounceRule(re.compile("mailbox has moved", re.IGNORECASE), "invalid_recipient")
    report = bounce("bob@example.com", "5.7.1", diagnostic="550 5.7.1 mailbox has moved, spam")
    assert not SuppressionList(path).record_bounce(report, now=T0)  # built in: content
    assert SuppressionList(path, rules=(rule,)).record_bounce(report, now=T0)
    assert SuppressionList(path).is_suppressed("bob@example.com").category == "invalid_recipient"


def test_record_bounce_keeps_an_existing_entry_and_ignores_non_bounces(path):
    suppression = SuppressionList(path)
    suppression.add("bob@example.com", "5.7.1", "complained", now=T0)
    before = path.stat()
    assert suppression.record_bounce(bounce("bob@example.com"), now=T0 + 10)
    assert path.stat().st_ino == before.st_ino  # nothing written
    assert suppression.is_suppressed("bob@example.com").reason == "complained"
    assert not suppression.record_bounce(bounce("carol@example.com", "2.0.0", "delivered"), now=T0)
    assert not suppression.record_bounce(bounce("not an address", "5.1.1"), now=T0)
    assert suppression.is_suppressed("carol@example.com") is None


def test_remove_forgets_soft_bounces(path):
    suppression = SuppressionList(path, soft_limit=2)
    suppression.record_bounce(bounce("bob@example.com", "4.2.2"), now=T0)
    suppression.remove("bob@example.com")
    assert not suppression.record_bounce(bounce("bob@example.com", "4.2.2"), now=T0 + 1)


def test_sees_changes_another_instance_made(path):
    daemon = SuppressionList(path)
    cli = SuppressionList(path)
    assert daemon.is_suppressed("bob@example.com") is None  # loaded (no file yet)
    cli.add("bob@example.com", "5.1.1", "manual")
    assert daemon.is_suppressed("bob@example.com") is not None
    daemon.record_bounce(bounce("carol@example.com"), now=T0)  # starts from the CLI's file
    assert {e.address for e in cli.entries()} == {"bob@example.com", "carol@example.com"}
    assert cli.remove("bob@example.com")
    assert daemon.is_suppressed("bob@example.com") is None
    path.unlink()  # the file removed by hand: the list is empty again
    assert daemon.entries() == []


def test_concurrent_writers_lose_nothing(path):
    instances = [SuppressionList(path), SuppressionList(path)]

    def add_some(n: int) -> None:
        for i in range(5):
            instances[n % 2].add(f"u{n}-{i}@example.com", "5.1.1", "x")

    threads = [threading.Thread(target=add_some, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(SuppressionList(path).entries()) == 40


@pytest.mark.parametrize("content", [
    b"{not json",
    b"[]",
    b'{"version": 2, "suppressed": {}, "soft": {}}',
    b'{"version": 1, "suppressed": [], "soft": {}}',
    b'{"version": 1, "suppressed": {"a@b": {"status": 5}}, "soft": {}}',
    b'{"version": 1, "suppressed": {}, "soft": {"a@b": ["x"]}}',
])
def test_a_damaged_file_is_reported_and_never_overwritten(path, content):
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    suppression = SuppressionList(path)
    with pytest.raises(SuppressionError, match=re.escape(str(path))):
        suppression.is_suppressed("bob@example.com")
    with pytest.raises(SuppressionError):
        suppression.add("bob@example.com", "5.1.1", "x")
    assert path.read_bytes() == content


@pytest.mark.parametrize("kwargs", [{"soft_limit": 0}, {"soft_window": 0}])
def test_settings_are_checked(path, kwargs):
    with pytest.raises(ValueError):
        SuppressionList(path, **kwargs)


# ---------------------------------------------------------------------------
# The pieces together


def test_a_verp_bounce_of_our_own_suppresses_the_recipient(path):
    recipient = Recipient("bob+news@remote.test", state=FAILED, attempts=1, status="5.1.1",
                          last_reply="550 5.1.1 user unknown", remote_mta="mx1.remote.test")
    data = own_dsn([recipient])
    to = email.message_from_bytes(data, policy=email.policy.default)["To"].addresses[0]
    reports = parse_dsn(data)
    assert verp_recipient(to.username, [r.recipient for r in reports]) == "bob+news@remote.test"
    suppression = SuppressionList(path)
    assert all(suppression.record_bounce(report, now=T0) for report in reports)
    assert suppression.is_suppressed("bob+news@remote.test").status == "5.1.1"


def test_scoped_entry_stops_mail_from_that_sender_domain_only(tmp_path):
    path = tmp_path / "suppression.json"
    listed = SuppressionList(path)
    listed.add("Bob@Example.com", "", "one-click unsubscribe", "unsubscribe", category="unsubscribe",
               scope="News.Example.org")
    assert listed.is_suppressed("bob@example.com") is None
    assert listed.is_suppressed("bob@example.com", "offers@other.example") is None
    entry = listed.is_suppressed("bob@example.com", "letters@news.example.org")
    assert entry is not None and entry.scope == "news.example.org" and entry.category == "unsubscribe"
    # Another process reads the same file and sees the entry with its class and scope.
    again = SuppressionList(path).entries()
    assert [(e.address, e.scope, e.source, e.category) for e in again] == [
        ("bob@example.com", "news.example.org", "unsubscribe", "unsubscribe")]
    assert listed.remove("bob@example.com")
    assert listed.is_suppressed("bob@example.com", "news.example.org") is None


def test_unscoped_entry_stops_every_sender_and_carries_its_class(tmp_path):
    listed = SuppressionList(tmp_path / "suppression.json")
    listed.add("ann@example.com", "5.1.1", "550 5.1.1 no such user", "bounce", category="invalid_recipient")
    entry = listed.is_suppressed("ann@example.com", "news@example.org")
    assert entry is not None and entry.category == "invalid_recipient" and entry.scope == ""
    with pytest.raises(ValueError, match="source"):
        listed.add("ann@example.com", "", "x", "whatever")
    with pytest.raises(ValueError, match="sender domain"):
        listed.add("ann@example.com", "", "x", "manual", scope="../etc")
