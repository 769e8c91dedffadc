"""MTA-STS (RFC 8461) and TLS-RPT (RFC 8460) outbound, end to end: the real daemon, the test
DNS server with the _mta-sts / _smtp._tls TXT records, an HTTPS policy server and MX sinks
with certificates from a private CA (relay.ca_file), all on 127.0.0.x."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import queue, submit, wait_for
from tests.support.dns import DNSServer
from tests.support.peers import Sink
from tests.support.pki import PolicyServer, TestCA

MX_PORT = free_port()
POLICY_HOST = "127.0.0.40"
MX1, MX2, REPORTS = "127.0.0.41", "127.0.0.42", "127.0.0.43"

ZONE = [
    ("sts.test", "MX", "10 mx1.sts.test"),
    ("mx1.sts.test", "A", MX1),
    ("_mta-sts.sts.test", "TXT", "v=STSv1; id=20261205a;"),
    ("mta-sts.sts.test", "A", POLICY_HOST),
    ("_smtp._tls.sts.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@reports.test"),
    ("reports.test", "MX", "10 mx.reports.test"),
    ("mx.reports.test", "A", REPORTS),
]


def policy(mode: str, *mx: str) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    """The CA, the DNS zone, the policy server (mta-sts.sts.test) and a report sink."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("mta-sts", "mta-sts.sts.test")
    dns = DNSServer(ZONE).start()
    server = PolicyServer(tmp_path / "policies", POLICY_HOST, cert, key)
    reports = Sink(tmp_path / "reports", address=REPORTS, port=MX_PORT)
    started: list[Sink] = [reports]

    def mx(address: str, label: str, *names: str, **options) -> Sink:
        cert, key = ca.issue(label, *names)
        sink = Sink(tmp_path / f"mx-{label}", address=address, port=MX_PORT, tls_cert=cert, tls_key=key, **options)
        started.append(sink)
        return sink

    yield {"ca": ca, "dns": dns, "server": server, "reports": reports, "mx": mx}
    for sink in started:
        sink.stop()
    server.stop()
    dns.stop()


def relay(world: dict, interval: str = "1d") -> str:
    return (f'nameservers = ["{world["dns"].nameserver}"]\nmx_port = {MX_PORT}\nmta_sts = true\n'
            f'ca_file = "{world["ca"].path}"\nmta_sts_port = {world["server"].port}\n'
            f'tls_report_interval = "{interval}"\n[queue]\nretry = ["1s"]\n')


def reports_of(sink: Sink) -> list[tuple[email.message.EmailMessage, dict]]:
    """Each TLS report mail the sink got, with its JSON report."""
    found = []
    for got in sink.messages():
        message = email.message_from_bytes(got["data"].encode("latin-1"), policy=email.policy.default)
        if message.get_content_type() != "multipart/report":
            continue
        [attachment] = [part for part in message.iter_attachments()
                        if part.get_content_type() == "application/tlsrpt+gzip"]
        found.append((message, json.loads(gzip.decompress(attachment.get_content()))))
    return found


def test_enforce_delivers_to_a_listed_mx_with_a_valid_certificate_and_reports_it(make_daemon, world):
    world["server"].publish("mta-sts.sts.test", policy("enforce", "*.sts.test"))
    mx1 = world["mx"](MX1, "mx1", "mx1.sts.test")
    daemon = make_daemon(extra=relay(world, interval="1s"))
    submit(daemon, ["bob@sts.test"], "enforced")
    [got] = wait_for(mx1.messages, what="delivery to mx1")
    assert got["rcpt_to"] == ["bob@sts.test"]
    assert any(c["tls"] for c in mx1.commands() if c["line"].startswith("MAIL"))
    assert world["server"].requests() == ["mta-sts.sts.test /.well-known/mta-sts.txt"]
    # The policy is kept in state_dir for max_age (RFC 8461 3.3, 5.1).
    assert "mode: enforce" in json.loads((daemon.root / "state" / "mta-sts" / "sts.test.json").read_text())["text"]

    [(message, report)] = wait_for(lambda: reports_of(world["reports"]), what="the TLS report")
    assert message["TLS-Report-Domain"] == "sts.test"
    assert message["TLS-Report-Submitter"] == "mail.example.test"
    assert message["Subject"].startswith("Report Domain: sts.test Submitter: mail.example.test Report-ID: <")
    assert message.get_param("report-type") == "tlsrpt"
    [entry] = report["policies"]
    assert entry["policy"]["policy-type"] == "sts" and entry["policy"]["policy-domain"] == "sts.test"
    assert entry["policy"]["mx-host"] == ["*.sts.test"]
    assert "mode: enforce" in entry["policy"]["policy-string"]
    assert entry["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    assert report["organization-name"] == "mail.example.test"
    assert world["reports"].messages()[0]["rcpt_to"] == ["tls@reports.test"]


def test_enforce_defers_when_the_certificate_does_not_name_the_mx(make_daemon, world):
    world["server"].publish("mta-sts.sts.test", policy("enforce", "mx1.sts.test"))
    mx1 = world["mx"](MX1, "wrong", "elsewhere.test")
    daemon = make_daemon(extra=relay(world, interval="1s"))
    submit(daemon, ["bob@sts.test"], "not for a stranger")

    def deferred() -> str:
        messages = queue(daemon)
        reply = messages[0]["recipients"][0]["last_reply"] if messages else ""
        return reply if "MTA-STS" in reply else ""

    reply = wait_for(deferred, what="a deferral naming MTA-STS")
    assert "MTA-STS policy of sts.test (enforce)" in reply and "certificate-host-mismatch" in reply
    assert queue(daemon)[0]["recipients"][0]["state"] == "deferred"
    assert not mx1.messages()
    assert not [c for c in mx1.commands() if c["line"].startswith("MAIL")]

    # (Each 1 s period with an attempt has its report; the first one is enough.)
    (_, report), *_ = wait_for(lambda: reports_of(world["reports"]), what="the TLS report")
    [entry] = report["policies"]
    assert entry["summary"]["total-successful-session-count"] == 0
    assert entry["summary"]["total-failure-session-count"] >= 1
    detail = entry["failure-details"][0]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx1.sts.test" and detail["receiving-ip"] == MX1


def test_enforce_skips_an_mx_the_policy_does_not_list(make_daemon, world):
    world["server"].publish("mta-sts.sts.test", policy("enforce", "mx9.sts.test"))
    mx1 = world["mx"](MX1, "mx1", "mx1.sts.test")
    daemon = make_daemon(extra=relay(world))
    submit(daemon, ["bob@sts.test"], "unlisted")
    reply = wait_for(lambda: (queue(daemon) or [{"recipients": [{"last_reply": ""}]}])[0]["recipients"][0]
                     ["last_reply"], what="a deferral")
    assert "is not one the policy lists" in reply and "mx9.sts.test" in reply
    assert mx1.commands() == []  # never even connected


def test_testing_mode_delivers_despite_a_bad_certificate(make_daemon, world):
    world["server"].publish("mta-sts.sts.test", policy("testing", "mx1.sts.test"))
    mx1 = world["mx"](MX1, "wrong", "elsewhere.test")
    daemon = make_daemon(extra=relay(world, interval="1s"))
    submit(daemon, ["bob@sts.test"], "testing only")
    [got] = wait_for(mx1.messages, what="delivery to mx1")
    assert got["rcpt_to"] == ["bob@sts.test"]
    [(_, report)] = wait_for(lambda: reports_of(world["reports"]), what="the TLS report")
    [entry] = report["policies"]
    assert "mode: testing" in entry["policy"]["policy-string"]
    assert entry["failure-details"][0]["result-type"] == "certificate-host-mismatch"


def test_a_cached_policy_outlives_the_policy_server_and_a_restart(make_daemon, world):
    world["server"].publish("mta-sts.sts.test", policy("enforce", "mx1.sts.test"))
    mx1 = world["mx"](MX1, "mx1", "mx1.sts.test")
    daemon = make_daemon(extra=relay(world))
    submit(daemon, ["bob@sts.test"], "first")
    wait_for(mx1.messages, what="the first delivery")
    daemon.stop()
    world["server"].stop()  # RFC 8461 5.1: a fetch failure falls back on the cached policy
    mx1.stop()
    wrong = world["mx"](MX1, "wrong", "elsewhere.test")
    daemon.start()
    submit(daemon, ["bob@sts.test"], "second")
    reply = wait_for(lambda: (queue(daemon) or [{"recipients": [{"last_reply": ""}]}])[0]["recipients"][0]
                     ["last_reply"], what="a deferral")
    assert "MTA-STS policy of sts.test (enforce)" in reply
    assert not wrong.messages()


def test_a_policy_that_cannot_be_fetched_is_no_policy_and_is_reported(make_daemon, world):
    # The TXT record says there is a policy, but the HTTPS server has none (404).
    mx1 = world["mx"](MX1, "wrong", "elsewhere.test")
    daemon = make_daemon(extra=relay(world, interval="1s"))
    submit(daemon, ["bob@sts.test"], "no policy after all")
    [got] = wait_for(mx1.messages, what="delivery as without MTA-STS")
    assert got["rcpt_to"] == ["bob@sts.test"]
    (_, report), *_ = wait_for(lambda: reports_of(world["reports"]), what="the TLS report")
    [entry] = report["policies"]
    assert entry["policy"]["policy-type"] == "sts" and entry["policy"]["policy-string"] == []
    [detail] = entry["failure-details"]
    assert detail["result-type"] == "sts-policy-fetch-error" and "HTTP 404" in detail["failure-reason-code"]
