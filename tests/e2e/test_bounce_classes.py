"""Issue 14's "Done when" for bounce classes: a campaign of 1,000 VERP messages to ten provider
domains whose MX sinks answer a mix of 250, 550 5.1.1, 552 5.2.2, 550 5.7.26, 421 4.7.28 and a
reputation 550 5.7.1, plus asynchronous DSNs to the VERP addresses. The suppression list then
holds exactly the invalid recipients (and the full mailboxes past bounces.soft_limit); nobody
refused for policy or authentication is on it; the blocked groups were paused, their pace
dropped, and the log and /metrics say why."""

from __future__ import annotations

import json
import smtplib
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailhost.feedback.dsn import build_dsn
from mailhost.queue.envelope import FAILED, Envelope, Recipient
from tests.e2e.conftest import RawSession, free_port
from tests.e2e.test_sending import MX_PORT, sinks, wait_for  # noqa: F401  (fixtures)
from tests.support.dns import DNSServer

DOMAINS = [f"p{n}.test" for n in range(10)]
AUTH_BLOCKED, REPUTATION_BLOCKED, RATE_LIMITED = "p9.test", "p8.test", "p7.test"
PER_DOMAIN = 100

DMARC = ("550 5.7.26 Unauthenticated email from example.test is not accepted due to domain's DMARC policy. "
         "Please contact the administrator of example.test domain. - gsmtp")
REPUTATION = ("550 5.7.1 Our system has detected that this message is likely suspicious due to the very low "
              "reputation of the sending IP address. To best protect our users from spam, the message has been "
              "blocked. - gsmtp")
RATE = ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP "
        "address. To protect our users from spam, mail sent from your IP address has been temporarily rate "
        "limited. - gsmtp")
UNKNOWN = "550 5.1.1 The email account that you tried to reach does not exist. - gsmtp"
FULL = "552 5.2.2 The recipient's inbox is out of storage space. - gsmtp"

# Local parts say what each recipient's MX answers (the sinks' scripts match on them).
SCRIPT = [
    {"when": "RCPT", "match": "gone", "reply": UNKNOWN},
    {"when": "RCPT", "match": "full", "reply": FULL},
]


def recipients(domain: str) -> list[str]:
    """100 a domain: 10 unknown, 10 with a full mailbox, 5 that bounce later by DSN (unknown),
    5 that get a later DSN for policy, the rest fine."""
    kinds = ["gone"] * 10 + ["full"] * 10 + ["late"] * 5 + ["dsnpolicy"] * 5 + ["ok"] * 70
    return [f"{kind}{n}@{domain}" for n, kind in enumerate(kinds)]


@pytest.fixture
def zone():
    records = []
    for n, domain in enumerate(DOMAINS):
        records += [(domain, "MX", f"10 mx.{domain}"), (f"mx.{domain}", "A", f"127.0.1.{n + 1}")]
    with DNSServer(records) as server:
        yield server


def send_campaign(port: int, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # a campaign tool in relay.networks
        for rcpt in rcpts:
            message = (f"From: News <news@example.test>\r\nTo: {rcpt}\r\nSubject: Spring offer\r\n"
                       f"Message-ID: <{rcpt}.spring@example.test>\r\n\r\nHello.\r\n").encode()
            client.sendmail("news@example.test", [rcpt], message)


def send_dsn(port: int, rcpt: str, status: str, reply: str) -> None:
    """The provider's later bounce of a message it had accepted, to the message's VERP address."""
    local, _, domain = rcpt.partition("@")
    failed = Recipient(rcpt, state=FAILED, status=status, last_reply=reply, remote_mta=f"mx.{domain}")
    now = time.time()
    report = build_dsn(Envelope("X", "news@example.test", [failed], now, now), [failed],
                       b"From: news@example.test\nSubject: Spring offer\n\nHello.\n", hostname=f"mx.{domain}",
                       kind="failure")
    session = RawSession(port, source="127.0.0.2")
    session.command(f"EHLO mx.{domain}")
    session.command("MAIL FROM:<>")
    assert session.command(f"RCPT TO:<bounces+{local}={domain}@example.test>").startswith("250")
    session.command("DATA")
    session.send(report.replace(b"\n", b"\r\n") + b".\r\n")
    assert session.reply().startswith("250")
    session.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
        if head == name and not wanted:
            return float(value)
    return 0.0


def test_a_campaign_suppresses_only_the_invalid_recipients_and_pauses_blocked_providers(make_daemon, zone, sinks):
    scripts = {domain: list(SCRIPT) for domain in DOMAINS}
    scripts[AUTH_BLOCKED] = [{"when": "RCPT", "reply": DMARC}]
    scripts[REPUTATION_BLOCKED] = [{"when": "RCPT", "reply": REPUTATION}]
    scripts[RATE_LIMITED] = [{"when": "RCPT", "reply": RATE, "times": 3}, *SCRIPT]
    mx = {domain: sinks(f"127.0.1.{n + 1}", script=scripts[domain]) for n, domain in enumerate(DOMAINS)}
    metrics_port = free_port()
    throttles = "".join(f'[[throttle]]\nname = "{d}"\nmx = ["{d}"]\nrate = 6000\nfloor = 60\nconnections = 4\n'
                        for d in (AUTH_BLOCKED, REPUTATION_BLOCKED, RATE_LIMITED))
    daemon = make_daemon(
        prelude=f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n',
        extra=(f'nameservers = ["{zone.nameserver}"]\nmx_port = {MX_PORT}\nverp = true\n'
               '[queue]\nretry = ["1s"]\nconcurrency = 100\n'
               '[bounces]\nsoft_limit = 2\nblock_pause = "1h"\n' + throttles))

    everyone = [rcpt for domain in DOMAINS for rcpt in recipients(domain)]
    assert len(everyone) == 1000
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda part: send_campaign(daemon.port, part), [everyone[i::4] for i in range(4)]))

    unblocked = [d for d in DOMAINS if d not in (AUTH_BLOCKED, REPUTATION_BLOCKED)]
    accepted = {r for d in unblocked for r in recipients(d) if not r.startswith(("gone", "full"))}
    wait_for(lambda: {m["rcpt_to"][0] for s in mx.values() for m in s.messages()} >= accepted, timeout=60,
             what="every accepted message delivered")

    def still_queued() -> set[str]:
        listing = json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"]
        return {r["address"].partition("@")[2] for m in listing for r in m["recipients"]}

    wait_for(lambda: still_queued() <= {AUTH_BLOCKED, REPUTATION_BLOCKED}, timeout=30,
             what="every unblocked recipient delivered or bounced")

    # The asynchronous bounces: unknown users reported later, a policy DSN, and a second full mailbox.
    late = [r for d in unblocked for r in recipients(d) if r.startswith("late")]
    for rcpt in late:
        send_dsn(daemon.port, rcpt, "5.1.1", UNKNOWN)
    for rcpt in (r for d in unblocked for r in recipients(d) if r.startswith("dsnpolicy")):
        send_dsn(daemon.port, rcpt, "5.7.1", REPUTATION)
    full_twice = [r for d in unblocked[:4] for r in recipients(d) if r.startswith("full")]
    for rcpt in full_twice:
        send_dsn(daemon.port, rcpt, "5.2.2", FULL)

    gone = {r for d in unblocked for r in recipients(d) if r.startswith("gone")}
    expected = gone | set(late) | set(full_twice)

    def listed() -> dict[str, dict]:
        return {e["address"]: e for e in json.loads(daemon.cli("suppress", "list", "--json").stdout)["suppressed"]}

    try:
        wait_for(lambda: set(listed()) >= expected, timeout=30, what="the suppression list to fill")
    except AssertionError:
        got = listed()
        raise AssertionError(f"missing {sorted(expected - set(got))[:10]}, extra {sorted(set(got) - expected)[:10]}")
    entries = listed()
    assert set(entries) == expected  # nobody else: not the blocked, not the rate-limited, not one soft full
    assert {entries[r]["class"] for r in gone | set(late)} == {"invalid_recipient"}
    assert {entries[r]["class"] for r in full_twice} == {"mailbox_full"}
    assert all("does not exist" in entries[r]["reason"] for r in gone)

    # The blocked providers' mail is still queued, mostly never tried: the group was paused.
    queue = json.loads(daemon.cli("queue", "list", "--json").stdout)
    queued = {r["address"]: r for m in queue["messages"] for r in m["recipients"]}
    for domain in (AUTH_BLOCKED, REPUTATION_BLOCKED):
        mine = [queued[r] for r in recipients(domain)]
        assert len(mine) == PER_DOMAIN and all(r["state"] in ("pending", "deferred") for r in mine)
        assert sum(r["attempts"] for r in mine) < 10
    assert queue["pace"][AUTH_BLOCKED]["rate"] == 60.0 and queue["pace"][AUTH_BLOCKED]["paused_for"] > 3000

    log = daemon.log()
    assert f"{AUTH_BLOCKED} blocks our mail (authentication, mx.{AUTH_BLOCKED} said: 550 5.7.26" in log
    assert f"{REPUTATION_BLOCKED} blocks our mail (policy, mx.{REPUTATION_BLOCKED} said: 550 5.7.1" in log
    metrics = scrape(metrics_port)
    assert sample(metrics, "mailhost_blocks_total", group=AUTH_BLOCKED, **{"class": "authentication"}) >= 1
    assert sample(metrics, "mailhost_blocks_total", group=REPUTATION_BLOCKED, **{"class": "policy"}) >= 1
    assert sample(metrics, "mailhost_throttle_rate_per_minute", group=AUTH_BLOCKED) == 60.0
    assert sample(metrics, "mailhost_throttle_paused_seconds", group=AUTH_BLOCKED) > 3000
    assert sample(metrics, "mailhost_bounces_total", kind="permanent", **{"class": "invalid_recipient"}) == len(gone)
    assert sample(metrics, "mailhost_bounces_total", kind="temporary", **{"class": "rate_limit"}) >= 1
