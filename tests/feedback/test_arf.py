"""Complaint reports (RFC 5965 ARF) as Yahoo's CFL, Microsoft's JMRP and redacting FBLs send them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhost.feedback.arf import is_feedback_report, parse_arf
from mailhost.feedback.suppression import verp_sender
from tests.support.arf import arf_report, jmrp_report


def test_yahoo_cfl_report_names_recipient_type_agent_and_original():
    complaint = parse_arf(arf_report())
    assert complaint is not None
    assert complaint.recipient == "bob@yahoo.test" and complaint.found_by == "original-rcpt-to"
    assert complaint.feedback_type == "abuse"
    assert complaint.user_agent == "Yahoo!-Mail-Feedback/2.0"
    assert complaint.message_id == "campaign-1.1@example.test"
    assert complaint.sender == "news@example.test"
    assert complaint.return_path == "bounces+bob=yahoo.test@example.test"
    assert complaint.source_ip == "192.0.2.10" and complaint.reported_domain == "example.test"
    assert complaint.sender_domains == {"example.test"}


def test_microsoft_jmrp_recipient_from_x_hmxmr_original_recipient():
    complaint = parse_arf(jmrp_report())
    assert complaint is not None
    assert complaint.recipient == "carol@hotmail.test" and complaint.found_by == "x-hmxmroriginalrecipient"
    assert complaint.user_agent == "Microsoft Junk Mail Reporting Program"
    assert complaint.sender == "news@example.test"


@pytest.mark.parametrize("redacted", ["xxxxxxxx@gmail.test", "redacted@gmail.test", "***@gmail.test", None])
def test_redacted_recipient_found_by_verp_return_path(redacted):
    recipient = "dave.o+news@gmail.test"
    path = verp_sender("example.test", recipient)
    report = arf_report(rcpt_to=redacted, return_path=path, to=redacted or "undisclosed-recipients:;",
                        user_agent="SomeFBL/1.0")
    complaint = parse_arf(report)
    assert complaint is not None
    assert (complaint.recipient, complaint.found_by) == (recipient, "verp")
    assert complaint.sender == "news@example.test"  # the From:, not the VERP envelope sender


def test_hashed_verp_tail_matched_against_the_original_to():
    recipient = "a-very-long-local-part-that-does-not-fit-a-readable-tail@subscribers.example.org"
    path = verp_sender("example.test", recipient)
    assert "=0" in path  # the hashed form
    complaint = parse_arf(arf_report(rcpt_to=None, return_path=path, to=f"Reader <{recipient}>"))
    assert complaint is not None and complaint.recipient == recipient and complaint.found_by == "verp"


def test_single_to_address_is_the_last_resort():
    complaint = parse_arf(arf_report(rcpt_to=None, return_path="news@example.test", to="Erin <erin@aol.test>"))
    assert complaint is not None and (complaint.recipient, complaint.found_by) == ("erin@aol.test", "to")
    assert parse_arf(arf_report(rcpt_to=None, return_path="news@example.test", to="a@aol.test, b@aol.test")) is None


def test_headers_only_original_and_base64_original():
    complaint = parse_arf(arf_report(original_type="text/rfc822-headers"))
    assert complaint is not None and complaint.message_id == "campaign-1.1@example.test"
    report = arf_report(rcpt_to=None, return_path="news@example.test", to="frank@yahoo.test")
    head, _, rest = report.partition(b"Content-Type: message/rfc822\nContent-Disposition: inline\n\n")
    original, _, tail = rest.partition(b"\n--")
    encoded = base64.encodebytes(original)
    b64 = head + b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n" + encoded + b"\n--" + tail
    assert parse_arf(b64).recipient == "frank@yahoo.test"


@pytest.mark.parametrize("kind", ["not-spam", "auth-failure", "virus", ""])
def test_other_feedback_types_are_not_complaints(kind):
    assert parse_arf(arf_report(feedback_type=kind)) is None


def test_crlf_report_reads_the_same():
    complaint = parse_arf(arf_report().replace(b"\n", b"\r\n"))
    assert complaint is not None and complaint.recipient == "bob@yahoo.test"


@pytest.mark.parametrize("report", [
    b"",
    b"From: x\n\nhello\n",
    arf_report().replace(b"report-type=feedback-report", b"report-type=delivery-status"),
    arf_report().replace(b"multipart/report", b"multipart/mixed"),
    arf_report().replace(b'boundary="----=_Part_ARF_1"', b""),
    arf_report().replace(b"Content-Type: message/feedback-report", b"Content-Type: text/plain"),
    arf_report(rcpt_to="not an address", return_path="news@example.test", to="a@x.test, b@x.test"),
    arf_report(rcpt_to="bob@yahoo.test\x00evil@x.test", return_path="news@example.test", to="a@x.test, b@x.test"),
    arf_report().split(b"Content-Type: message/feedback-report")[0],  # cut before the fields
    b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n" + b"--b\n" * 100000,
])
def test_malformed_reports_give_nothing(report):
    assert parse_arf(report) is None


def test_huge_original_still_read_from_its_header_section():
    big = arf_report().replace(b"Buy now.\n", b"Buy now.\n" + (b"y" * 76 + b"\n") * 80000)
    assert len(big) > 5 * 1024 * 1024
    complaint = parse_arf(big)
    assert complaint is not None and complaint.recipient == "bob@yahoo.test"


def test_is_feedback_report_is_a_cheap_look_at_the_top():
    assert is_feedback_report(arf_report())
    assert not is_feedback_report(b"From: a\n\nContent-Type: multipart/report; report-type=feedback-report\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=3000))
def test_never_raises(noise, at):
    report = arf_report()
    parse_arf(noise)
    mangled = report[:at] + noise + report[at:]
    result = parse_arf(mangled)
    assert result is None or "@" in result.recipient
