"""TLS-RPT (RFC 8460): the record, the counts per period and process, the report and its mail."""

from __future__ import annotations

import email
import email.policy
import gzip
import json

import pytest
from twisted.internet.defer import succeed

from mailhost.delivery.tlsrpt import (MAX_DETAILS, ReportPolicy, TlsReporter, TlsResults, build_report,
                                      parse_tlsrpt_record, period_start, report_message)
from mailhost.smtp.client import TlsFailure


@pytest.mark.parametrize("records, expected", [
    (["v=TLSRPTv1; rua=mailto:tls@example.net"], ["tls@example.net"]),
    (["v=TLSRPTv1;rua=mailto:a@example.net,mailto:b@example.net"], ["a@example.net", "b@example.net"]),
    (["v=TLSRPTv1; rua=https://reports.example.net/v1"], []),  # https is not sent
    (["v=TLSRPTv1; rua=mailto:tls%2Bx@example.net"], ["tls+x@example.net"]),
    (["v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"], []),
    (["v=spf1 -all"], []),
    (["v=TLSRPTv1; rua=mailto:bad address@example.net"], []),
    (["v=TLSRPTv1; rua=mailto:a@example.net\r\nBcc: x@evil.example"], []),
])
def test_record(records, expected):
    assert parse_tlsrpt_record(records) == expected


POLICY = ReportPolicy("example.net", "sts", ("version: STSv1", "mode: enforce", "mx: *.example.net", "max_age: 60"),
                      ("*.example.net",))


def test_counts_are_kept_per_period_and_merged_across_processes(tmp_path):
    now = [86400 * 10 + 5.0]
    one = TlsResults(tmp_path, 0, clock=lambda: now[0])
    two = TlsResults(tmp_path, 1, clock=lambda: now[0])
    one.record(POLICY, None)
    one.record(POLICY, TlsFailure("certificate-expired", "expired"), "mx1.example.net", "192.0.2.1")
    one.flush()
    one.record(POLICY, None)
    one.flush()  # adds to the same file
    two.record(POLICY, None)
    two.flush()
    start = period_start(now[0], 86400)
    assert sorted(p.name for p in (tmp_path / str(start)).iterdir()) == ["p0.json", "p1.json"]
    [entry] = json.loads((tmp_path / str(start) / "p0.json").read_text())
    assert (entry["success"], entry["failure"]) == (2, 1)

    sent: list[tuple[str, bytes]] = []

    class Dns:
        def txt(self, name):
            assert name == "_smtp._tls.example.net"
            return succeed(["v=TLSRPTv1; rua=mailto:tls@example.net"])

    def notify(address, message):
        sent.append((address, message))
        return succeed("QID")

    def at_once(function, *args):
        return succeed(function(*args))

    reporter = TlsReporter(tmp_path, Dns(), notify, "mail.example.org", clock=lambda: now[0], run_blocking=at_once)
    reporter.run()
    assert sent == []  # the day is not over
    now[0] += 86400 + 120
    reporter.run()
    [(address, message)] = sent
    assert address == "tls@example.net"
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    [attachment] = list(parsed.iter_attachments())
    report = json.loads(gzip.decompress(attachment.get_content()))
    [policy] = report["policies"]
    assert policy["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert policy["failure-details"] == [{"result-type": "certificate-expired", "failed-session-count": 1,
                                          "receiving-ip": "192.0.2.1", "receiving-mx-hostname": "mx1.example.net",
                                          "failure-reason-code": "expired"}]
    assert report["date-range"] == {"start-datetime": "1970-01-11T00:00:00Z", "end-datetime": "1970-01-11T23:59:59Z"}
    assert not (tmp_path / str(start)).exists()  # sent, then removed
    reporter.run()
    assert len(sent) == 1


def test_failure_details_are_bounded(tmp_path):
    results = TlsResults(tmp_path, 0, clock=lambda: 100.0)
    for n in range(MAX_DETAILS + 20):
        results.record(POLICY, TlsFailure("validation-failure", f"reason {n}"), f"mx{n}.example.net")
    results.flush()
    [entry] = json.loads(next(tmp_path.glob("*/p0.json")).read_text())
    assert entry["failure"] == MAX_DETAILS + 20 and len(entry["details"]) == MAX_DETAILS


def test_report_mail_has_the_rfc_8460_fields():
    report = build_report("example.net", [], 0, 86400, "mail.example.org", "r1@mail.example.org")
    message = report_message(report, "example.net", "tls@example.net", "mail.example.org", 0, 86400)
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "Report Domain: example.net Submitter: mail.example.org Report-ID: <r1@mail.example.org>"
    assert parsed["TLS-Report-Domain"] == "example.net" and parsed["TLS-Report-Submitter"] == "mail.example.org"
    assert parsed.get_content_type() == "multipart/report" and parsed.get_param("report-type") == "tlsrpt"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == "mail.example.org!example.net!0!86399!r1.json.gz"
    assert b"\r\n" not in message  # LF line ends, as the intake takes messages
