"""DANE outbound (RFC 7672), end to end: the real daemon resolves through a real validating
resolver (unbound) over a DNSSEC-signed zone (ldns-signzone, served by nsd), and delivers
to MX sinks whose certificates match their TLSA records, or do not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import queue, submit, wait_for
from tests.support.dnssec import ValidatingDNS, missing_tools
from tests.support.peers import Sink
from tests.support.pki import PolicyServer, TestCA, cert_sha256, spki_sha256

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (tests/ensure-peers)")

MX_PORT = free_port()
GOOD, BAD, TA, POLICY_HOST = "127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54"


@pytest.fixture(scope="module")
def dane_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("dane")
    ca = TestCA(folder / "ca")
    certs = {"good": ca.issue("good", "mxgood.dane.test"), "bad": ca.issue("bad", "mxbad.dane.test"),
             "ta": ca.issue("ta", "mxta.dane.test", with_ca=True)}
    decoy = ca.issue("decoy", "mxbad.dane.test")  # what mxbad's TLSA record names instead of its own key
    records = [
        "good IN MX 10 mxgood.dane.test.", f"mxgood IN A {GOOD}",
        f"_{MX_PORT}._tcp.mxgood IN TLSA 3 1 1 {spki_sha256(certs['good'][0])}",
        "bad IN MX 10 mxbad.dane.test.", f"mxbad IN A {BAD}",
        f"_{MX_PORT}._tcp.mxbad IN TLSA 3 1 1 {spki_sha256(decoy[0])}",
        "ta IN MX 10 mxta.dane.test.", f"mxta IN A {TA}",
        f"_{MX_PORT}._tcp.mxta IN TLSA 2 0 1 {cert_sha256(ca.pem)}",
        # both: DANE for its MX, and an MTA-STS policy that does not list that MX.
        "both IN MX 10 mxgood.dane.test.", '_mta-sts.both IN TXT "v=STSv1; id=1"', f"mta-sts.both IN A {POLICY_HOST}",
    ]
    policies = PolicyServer(folder / "policies", POLICY_HOST, *ca.issue("sts", "mta-sts.both.dane.test"))
    policies.publish("mta-sts.both.dane.test", "version: STSv1\nmode: enforce\nmx: mx9.dane.test\nmax_age: 86400\n")
    try:
        with ValidatingDNS(folder / "dns", "dane.test", records) as dns:
            yield {"dns": dns, "certs": certs, "folder": folder, "ca": ca, "policies": policies}
    finally:
        policies.stop()


@pytest.fixture
def mx(dane_world: dict, tmp_path: Path) -> Iterator:
    started: list[Sink] = []

    def start(address: str, label: str) -> Sink:
        cert, key = dane_world["certs"][label]
        sink = Sink(tmp_path / f"mx-{label}", address=address, port=MX_PORT, tls_cert=cert, tls_key=key)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def relay(dane_world: dict, more: str = "") -> str:
    return (f'nameservers = ["{dane_world["dns"].nameserver}"]\nmx_port = {MX_PORT}\ndane = true\n{more}'
            '[queue]\nretry = ["1s"]\n')


def test_delivered_when_the_certificate_matches_its_tlsa_record(make_daemon, dane_world, mx):
    good, ta = mx(GOOD, "good"), mx(TA, "ta")
    daemon = make_daemon(extra=relay(dane_world))
    submit(daemon, ["bob@good.dane.test"], "DANE-EE")
    submit(daemon, ["carol@ta.dane.test"], "DANE-TA")
    [got] = wait_for(good.messages, what="delivery to mxgood (3 1 1)")
    assert got["rcpt_to"] == ["bob@good.dane.test"]
    [got] = wait_for(ta.messages, what="delivery to mxta (2 0 1)")
    assert got["rcpt_to"] == ["carol@ta.dane.test"]
    for sink in (good, ta):
        assert all(c["tls"] for c in sink.commands() if c["line"].startswith("MAIL"))
    wait_for(lambda: queue(daemon) == [], what="an empty queue")
    daemon.stop()  # writes the TLS-RPT counts: both sessions were held to DANE and passed
    counted = {}
    for path in (daemon.root / "state" / "tlsrpt").glob("*/p0.json"):
        for entry in json.loads(path.read_text()):
            domain, kind, strings, _ = json.loads(entry["policy"])
            counted[domain] = (kind, entry["success"], entry["failure"], strings[0].split()[:3])
    assert counted == {"mxgood.dane.test": ("tlsa", 1, 0, ["3", "1", "1"]),
                       "mxta.dane.test": ("tlsa", 1, 0, ["2", "0", "1"])}


def test_deferred_when_the_certificate_does_not_match_its_tlsa_record(make_daemon, dane_world, mx):
    bad = mx(BAD, "bad")
    daemon = make_daemon(extra=relay(dane_world))
    submit(daemon, ["bob@bad.dane.test"], "wrong key")

    def reply() -> str:
        messages = queue(daemon)
        text = messages[0]["recipients"][0]["last_reply"] if messages else ""
        return text if "DANE" in text else ""

    text = wait_for(reply, what="a deferral naming DANE")
    assert "DANE TLSA of mxbad.dane.test" in text and "matches none of the TLSA records" in text
    assert queue(daemon)[0]["recipients"][0]["state"] == "deferred"
    assert not bad.messages()
    assert not [c for c in bad.commands() if c["line"].startswith("MAIL")]


def test_dane_wins_over_mta_sts(make_daemon, dane_world, mx):
    # both.dane.test's MTA-STS policy (enforce) lists only mx9, but its MX has TLSA records:
    # RFC 8461 2 leaves that MX to DANE, which it passes.
    good = mx(GOOD, "good")
    daemon = make_daemon(extra=relay(dane_world, f'mta_sts = true\nca_file = "{dane_world["ca"].path}"\n'
                                                 f'mta_sts_port = {dane_world["policies"].port}\n'))
    submit(daemon, ["bob@both.dane.test"], "DANE first")
    [got] = wait_for(good.messages, what="delivery to mxgood under DANE")
    assert got["rcpt_to"] == ["bob@both.dane.test"]
    assert "mta-sts.both.dane.test /.well-known/mta-sts.txt" in dane_world["policies"].requests()
