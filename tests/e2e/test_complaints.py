"""Complaints end to end: a feedback-loop report by SMTP suppresses the recipient, and the
complaint rate on /metrics and in the log moves."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage

from tests.e2e.conftest import RawSession, free_port
from tests.e2e.test_metrics import healthy, scrape, value
from tests.e2e.test_sending import dns, relay_config, sinks, wait_for  # noqa: F401  (fixtures)
from tests.support.arf import arf_report

RECIPIENTS = [f"reader{n}@remote.test" for n in range(1000)]  # feedback.complaints.MIN_DELIVERED


def campaign(daemon, rcpts: list[str]) -> None:
    msg = EmailMessage()
    msg["From"] = "news@example.test"
    msg["To"] = "undisclosed-recipients:;"
    msg["Subject"] = "Spring sale"
    msg.set_content("Buy now.\n")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:  # a relay-network campaign tool
        assert client.send_message(msg, from_addr="news@example.test", to_addrs=rcpts) == {}


def feedback_loop(daemon, rcpt: str, tag: str) -> str:
    """What a provider's FBL does: a report by MX, from outside relay.networks, to our FBL address."""
    session = RawSession(daemon.port, source="127.0.0.2")
    try:
        session.command("EHLO fbl.provider.test")
        assert session.command("MAIL FROM:<feedback@fbl.provider.test>").startswith("250")
        assert session.command("RCPT TO:<fbl@example.test>").startswith("250")  # no mailbox: accepted all the same
        assert session.command("DATA").startswith("354")
        report = arf_report(rcpt_to=rcpt, return_path="news@example.test", to=rcpt, tag=tag)
        session.send(report.replace(b"\n", b"\r\n") + b".\r\n")
        return session.reply()
    finally:
        session.close()


def test_arf_report_suppresses_and_moves_the_complaint_rate(make_daemon, dns, sinks):  # noqa: F811
    port = free_port()
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns) + '[feedback]\naddresses = ["fbl@example.test"]\n',
                         limits="recipients = 1000",
                         prelude=f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
    wait_for(lambda: healthy(port), what="healthy")
    campaign(daemon, RECIPIENTS)
    wait_for(lambda: value(scrape(port), 'mailhost_deliveries_total{result="delivered"}') == len(RECIPIENTS),
             what="the campaign delivered")
    assert mx1.messages()

    assert feedback_loop(daemon, "reader1@remote.test", "1").startswith("250")
    assert feedback_loop(daemon, "reader2@remote.test", "2").startswith("250")
    wait_for(lambda: "complaint rate of remote.test above 0.1%" in daemon.log(), what="the warning")
    text = scrape(port)
    assert value(text, 'mailhost_complaint_rate{provider="remote.test"}') == 0.002
    assert value(text, 'mailhost_complaints_total{provider="remote.test"}') == 2

    listed = {e["address"]: e for e in json.loads(daemon.cli("suppress", "list", "--json").stdout)["suppressed"]}
    assert listed["reader1@remote.test"]["source"] == "complaint"
    assert "reader3@remote.test" not in listed

    for n in (3, 4):
        assert feedback_loop(daemon, f"reader{n}@remote.test", str(n)).startswith("250")
    wait_for(lambda: "complaint rate of remote.test above 0.3%" in daemon.log(), what="the error")
    assert value(scrape(port), 'mailhost_complaint_rate{provider="remote.test"}') == 0.004
    log = daemon.log()
    assert log.count("complaint rate of remote.test above 0.1%") == 1  # once per crossing
    assert "2 complaints / 1000 delivered in 24h = 0.20%" in log
    # Consumed: in no Maildir.
    assert not any((daemon.root / "mail").rglob("new/*"))
    # The next campaign leaves the complainers out.
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo()
        client.mail("news@example.test")
        code, text = client.rcpt("reader1@remote.test")
    assert code == 550 and b"suppressed" in text
