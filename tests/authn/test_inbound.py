"""Inbound SPF, DKIM and DMARC (mailhost/inbound_auth.py) against the test DNS server.

Messages are signed with dkimpy (and once with mailhost's own signer) using keys
whose public parts the zone publishes; the client is 127.0.0.1 throughout.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dkim
import pytest
import spf

from mailhost.authn import dkim as dkim_sign
from mailhost.authn.inbound import AuthVerdict, evaluate, strip_forged_results
from tests.support.dns import DNSServer

HOSTNAME = "mail.example.test"
SPF_PASS = "v=spf1 ip4:127.0.0.1 -all"


def message(from_: str = "Alice <alice@x.test>", body: bytes = b"Hello.\n", extra: bytes = b"") -> bytes:
    return (
        f"From: {from_}\nTo: bob@example.test\nSubject: Lunch\nDate: Sun, 29 Nov 2026 10:00:00 +0000\n"
        f"Message-ID: <1@x.test>\n".encode()
        + extra + b"\n" + body
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dkim_sign.DkimKey, str]]:
    """An RSA and an ed25519 key: (key, the TXT record value publishing its public part)."""
    state = tmp_path_factory.mktemp("state")
    made = {}
    for name, algorithm in (("rsa", dkim_sign.RSA), ("ed25519", dkim_sign.ED25519)):
        path, record = dkim_sign.generate(state, "x.test", name, algorithm)
        made[name] = (dkim_sign.load_key(path, "x.test", name), record)
    return made


def sign(data: bytes, key: dkim_sign.DkimKey, domain: str = "x.test", selector: str = "s1") -> bytes:
    linesep = b"\r\n" if b"\r\n" in data else b"\n"
    signature = dkim.sign(data, selector.encode(), domain.encode(), key.private,
                          include_headers=[b"from", b"to", b"subject", b"date"],
                          signature_algorithm=key.algorithm.encode(), linesep=linesep)
    return signature + data


@pytest.fixture(scope="module")
def dns_server(keys) -> Iterator[DNSServer]:
    rsa, ed = keys["rsa"][1], keys["ed25519"][1]
    zone = [
        # SPF, one domain per outcome
        ("spf-pass.test", "TXT", SPF_PASS),
        ("spf-fail.test", "TXT", "v=spf1 ip4:192.0.2.1 -all"),
        ("spf-softfail.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all"),
        ("spf-neutral.test", "TXT", "v=spf1 ?all"),
        ("spf-none.test", "TXT", "google-site-verification=abc"),  # a TXT record, not SPF
        ("spf-two.test", "TXT", "v=spf1 +all"),
        ("spf-two.test", "TXT", "v=spf1 -all"),
        ("spf-include.test", "TXT", "v=spf1 include:spf-pass.test -all"),
        ("spf-mx.test", "TXT", "v=spf1 mx -all"),
        ("spf-mx.test", "MX", "10 mx.spf-mx.test"),
        ("mx.spf-mx.test", "A", "127.0.0.1"),
        ("spf-v6.test", "TXT", "v=spf1 ip6:::1 -all"),
        ("mx.helo.test", "TXT", "v=spf1 a -all"),
        ("mx.helo.test", "A", "127.0.0.1"),
        ("other.test", "TXT", "v=spf1 -all"),
        # DKIM keys
        ("s1._domainkey.x.test", "TXT", rsa),
        ("ed._domainkey.x.test", "TXT", ed),
        ("rsa._domainkey.x.test", "TXT", rsa),
        ("s1._domainkey.evil.co.uk", "TXT", rsa),
        ("s1._domainkey.dkimbroken.test", "TXT", rsa),
        ("s1._domainkey.badkey.test", "TXT", "v=DKIM1; k=rsa; p=bm90IGEga2V5"),
        # DMARC
        ("x.test", "TXT", SPF_PASS),
        ("_dmarc.x.test", "TXT", "v=DMARC1; p=reject; sp=quarantine"),
        ("_dmarc.spfd.test", "TXT", "v=DMARC1; p=quarantine"),
        ("mail.spfd.test", "TXT", SPF_PASS),
        ("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject; aspf=s"),
        ("mail.strict.test", "TXT", SPF_PASS),
        ("_dmarc.bank.co.uk", "TXT", "v=DMARC1; p=reject"),
        ("_dmarc.dkimbroken.test", "TXT", "v=DMARC1; p=reject"),
        ("_dmarc.nop.test", "TXT", "v=DMARC1; p=bogus; rua=mailto:d@nop.test"),
        ("_dmarc.twice.test", "TXT", "v=DMARC1; p=reject"),
        ("_dmarc.twice.test", "TXT", "v=DMARC1; p=none"),
    ]
    servfail = ["spf-broken.test", "s1._domainkey.dkimbroken.test", "_dmarc.dmarcbroken.test"]
    with DNSServer(zone, servfail=servfail, timeout=["slow.test"]) as server:
        yield server


def nameservers(server: DNSServer) -> tuple[tuple[str, int], ...]:
    assert server.port is not None
    return ((server.host, server.port),)


@pytest.fixture
def check(dns_server: DNSServer):
    def run(data: bytes = b"", mail_from: str = "a@spf-pass.test", helo: str = "mx.helo.test",
            client_ip: str = "127.0.0.1", timeout: float = 2.0) -> AuthVerdict:
        return evaluate(hostname=HOSTNAME, client_ip=client_ip, helo=helo, mail_from=mail_from,
                        message=data or message(from_="a@nodmarc.test"), nameservers=nameservers(dns_server),
                        timeout=timeout)

    return run


def resinfos(verdict: AuthVerdict) -> list[str]:
    """The header's parts after the authserv-id."""
    assert "\r" not in verdict.header and "\n" not in verdict.header
    authserv_id, *parts = verdict.header.split("; ")
    assert authserv_id == HOSTNAME
    return parts


# -- SPF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mail_from, client_ip, expected", [
    ("a@spf-pass.test", "127.0.0.1", "pass"),
    ("a@spf-pass.test", "127.0.0.2", "fail"),
    ("a@spf-fail.test", "127.0.0.1", "fail"),
    ("a@spf-softfail.test", "127.0.0.1", "softfail"),
    ("a@spf-neutral.test", "127.0.0.1", "neutral"),
    ("a@spf-none.test", "127.0.0.1", "none"),
    ("a@nowhere.test", "127.0.0.1", "none"),            # NXDOMAIN
    ("a@spf-two.test", "127.0.0.1", "permerror"),       # two SPF records
    ("a@spf-broken.test", "127.0.0.1", "temperror"),    # SERVFAIL
    ("a@spf-include.test", "127.0.0.1", "pass"),
    ("a@spf-include.test", "127.0.0.9", "fail"),
    ("a@spf-mx.test", "127.0.0.1", "pass"),
    ("a@spf-v6.test", "::1", "pass"),
    ("a@spf-v6.test", "127.0.0.1", "fail"),
    ("a@[127.0.0.1]", "127.0.0.1", "none"),             # no domain to check
])
def test_spf_for_the_envelope_sender(check, mail_from, client_ip, expected):
    verdict = check(mail_from=mail_from, client_ip=client_ip)
    assert verdict.spf == expected
    assert resinfos(verdict)[0] == f"spf={expected} smtp.mailfrom={mail_from}".replace(
        "a@[127.0.0.1]", '"a@[127.0.0.1]"')


@pytest.mark.parametrize("helo, client_ip, expected", [
    ("mx.helo.test", "127.0.0.1", 'spf=pass smtp.helo=mx.helo.test'),
    ("mx.helo.test", "127.0.0.2", 'spf=fail smtp.helo=mx.helo.test'),
    ("unknown.helo.test", "127.0.0.1", 'spf=none smtp.helo=unknown.helo.test'),
    ("[127.0.0.1]", "127.0.0.1", 'spf=none smtp.helo="[127.0.0.1]"'),   # an address literal is not checked
    ("localhost", "127.0.0.1", 'spf=none smtp.helo=localhost'),         # nor a single label
])
def test_spf_for_the_helo_identity(check, helo, client_ip, expected):
    verdict = check(helo=helo, client_ip=client_ip)
    assert resinfos(verdict)[1] == expected


@pytest.mark.parametrize("mail_from", ["", "<>"])
def test_the_null_sender_is_checked_as_postmaster_at_the_helo_name(check, mail_from):
    verdict = check(mail_from=mail_from, helo="mx.helo.test")
    assert verdict.spf == "pass"
    assert resinfos(verdict)[:2] == ["spf=pass smtp.mailfrom=postmaster@mx.helo.test", "spf=pass smtp.helo=mx.helo.test"]


def test_each_evaluation_uses_its_own_name_servers(dns_server, monkeypatch):
    # pyspf's DNS hook is a module global; two evaluations on parallel threads, both inside
    # pyspf at once, must each still ask their own name servers.
    barrier = threading.Barrier(2, timeout=10)
    original = spf.query.check

    def check_together(self, *args, **kwargs):
        barrier.wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(spf.query, "check", check_together)
    with DNSServer([("spf-pass.test", "TXT", "v=spf1 -all")]) as other:
        def run(server: DNSServer) -> str:
            return evaluate(hostname=HOSTNAME, client_ip="127.0.0.1", helo="mx.helo.test", mail_from="a@spf-pass.test",
                            message=message(), nameservers=nameservers(server), timeout=2.0).spf

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(run, [dns_server, other]))
    assert results == ["pass", "fail"]


# -- DKIM ---------------------------------------------------------------------------------------


def b_tag(signed: bytes, index: int = 0) -> str:
    """The first 8 characters of the b= value of the index-th DKIM-Signature."""
    values = re.findall(rb"DKIM-Signature:(.*?)\r?\n(?! |\t)", signed, re.S)
    b_value = re.search(rb"\bb=([^;]*)", values[index]).group(1)
    return re.sub(rb"\s+", b"", b_value)[:8].decode()


def test_dkim_pass_header_in_full(check, keys):
    key = keys["rsa"][0]
    signed = sign(message(), key)
    verdict = check(signed, mail_from="a@x.test")
    assert (verdict.spf, verdict.dkim, verdict.dmarc, verdict.dmarc_policy) == ("pass", "pass", "pass", None)
    header_b = b_tag(signed)
    b_value = f'"{header_b}"' if "/" in header_b else header_b  # a "/" is not allowed in a token
    assert verdict.header == (
        "mail.example.test; spf=pass smtp.mailfrom=a@x.test; spf=pass smtp.helo=mx.helo.test; "
        f"dkim=pass header.d=x.test header.s=s1 header.b={b_value}; dmarc=pass header.from=x.test"
    )


@pytest.mark.parametrize("case, expected", [
    ("signed", "pass"),
    ("ed25519", "pass"),
    ("mailhost signer", "pass"),
    ("crlf", "pass"),
    ("body altered", "fail"),
    ("header altered", "fail"),
    ("unsigned", "none"),
    ("no key published", "permerror"),
    ("unusable key", "permerror"),
    ("key lookup SERVFAIL", "temperror"),
    ("key lookup timeout", "temperror"),
    ("signature without d=", "permerror"),
])
def test_dkim_results(check, keys, case, expected):
    rsa, ed = keys["rsa"][0], keys["ed25519"][0]
    plain = message()
    data = {
        "signed": lambda: sign(plain, rsa),
        "ed25519": lambda: sign(plain, ed, selector="ed"),
        "mailhost signer": lambda: dkim_sign.sign(plain, rsa) + plain,  # outbound signing verifies inbound
        "crlf": lambda: sign(plain.replace(b"\n", b"\r\n"), rsa),
        "body altered": lambda: sign(plain, rsa).replace(b"Hello.", b"Hello!"),
        "header altered": lambda: sign(plain, rsa).replace(b"Subject: Lunch", b"Subject: Dinner"),
        "unsigned": lambda: plain,
        "no key published": lambda: sign(plain, rsa, selector="s9"),
        "unusable key": lambda: sign(plain, rsa, domain="badkey.test"),
        "key lookup SERVFAIL": lambda: sign(plain, rsa, domain="dkimbroken.test"),
        "key lookup timeout": lambda: sign(plain, rsa, domain="slow.test"),
        "signature without d=": lambda: b"DKIM-Signature: v=1; a=rsa-sha256; s=s1; h=from; bh=AAAA; b=AAAA\n" + plain,
    }[case]()
    verdict = check(data, mail_from="a@x.test", timeout=0.5 if "timeout" in case else 2.0)
    assert verdict.dkim == expected
    assert any(part.startswith(f"dkim={expected}") for part in resinfos(verdict))


def test_every_signature_is_reported_and_the_best_result_wins(check, keys):
    rsa = keys["rsa"][0]
    good = sign(message(), rsa)
    both = sign(good, rsa, selector="s9")  # a second signature on top, its key not published
    verdict = check(both, mail_from="a@x.test")
    assert verdict.dkim == "pass"
    dkim_parts = [p for p in resinfos(verdict) if p.startswith("dkim=")]
    assert len(dkim_parts) == 2
    assert dkim_parts[0].startswith("dkim=permerror header.d=x.test header.s=s9 header.b=")
    assert dkim_parts[1].startswith("dkim=pass header.d=x.test header.s=s1 header.b=")


# -- DMARC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, from_, mail_from, signer, dmarc, policy", [
    ("aligned DKIM, SPF fails", "a@x.test", "bounce@other.test", "x.test", "pass", None),
    ("aligned SPF (relaxed), unsigned", "a@spfd.test", "b@mail.spfd.test", None, "pass", None),
    ("nothing aligned", "a@x.test", "bounce@other.test", None, "fail", "reject"),
    ("SPF passes but not aligned", "a@x.test", "a@spf-pass.test", None, "fail", "reject"),
    ("subdomain takes sp=", "a@news.x.test", "bounce@other.test", None, "fail", "quarantine"),
    ("aspf=s needs the exact domain", "a@strict.test", "b@mail.strict.test", None, "fail", "reject"),
    ("public suffix is not an organization", "a@bank.co.uk", "bounce@other.test", "evil.co.uk", "fail", "reject"),
    ("no record", "a@nodmarc.test", "a@spf-pass.test", None, "none", None),
    ("invalid p= with rua acts as none", "a@nop.test", "bounce@other.test", None, "fail", "none"),
    ("two records: no DMARC", "a@twice.test", "bounce@other.test", None, "none", None),
    ("record lookup SERVFAIL", "a@dmarcbroken.test", "bounce@other.test", None, "temperror", None),
    ("aligned DKIM key lookup SERVFAIL", "a@dkimbroken.test", "bounce@other.test", "dkimbroken.test", "temperror", None),
])
def test_dmarc(check, keys, case, from_, mail_from, signer, dmarc, policy):
    data = message(from_=from_)
    if signer:
        data = sign(data, keys["rsa"][0], domain=signer)
    verdict = check(data, mail_from=mail_from)
    assert (verdict.dmarc, verdict.dmarc_policy) == (dmarc, policy)
    from_domain = from_.rpartition("@")[2]
    expected = f"dmarc={dmarc} (p={policy}) header.from={from_domain}" if dmarc == "fail" else \
        f"dmarc={dmarc} header.from={from_domain}"
    assert resinfos(verdict)[-1] == expected


def test_dmarc_subdomain_aligned_dkim(check, keys):
    # From a subdomain, signed by the organizational domain: relaxed alignment passes.
    verdict = check(sign(message(from_="a@news.x.test"), keys["rsa"][0]), mail_from="bounce@other.test")
    assert (verdict.dkim, verdict.dmarc) == ("pass", "pass")


@pytest.mark.parametrize("extra", [b"From: b@x.test\n", b""])
def test_dmarc_permerror_without_one_from_domain(check, extra):
    data = message(extra=extra) if extra else b"To: bob@example.test\nSubject: no From\n\nHi\n"
    verdict = check(data, mail_from="a@x.test")
    assert (verdict.dmarc, verdict.dmarc_policy) == ("permerror", None)
    assert resinfos(verdict)[-1].startswith("dmarc=permerror")


# -- strip_forged_results -----------------------------------------------------------------------

BODY = b"Authentication-Results: mail.example.test; spf=pass\n\xff\x00 binary \r\n.\n"


@pytest.mark.parametrize("header, kept", [
    (b"Authentication-Results: mail.example.test; spf=pass smtp.mailfrom=a@x.test\n", False),
    (b"Authentication-Results: MAIL.Example.TEST; dkim=pass\n", False),
    (b"authentication-results:mail.example.test;dkim=pass\n", False),
    (b"Authentication-Results: mail.example.test.; none\n", False),
    (b"Authentication-Results: mail.example.test 1; spf=pass\n", False),            # with a version
    (b'Authentication-Results: "mail.example.test"; spf=pass\n', False),              # quoted
    (b"Authentication-Results: (forged (nested)) mail.example.test; spf=pass\n", False),
    (b"Authentication-Results:\n mail.example.test;\n\tspf=pass smtp.mailfrom=a@x.test;\n dkim=pass\n", False),
    (b"Authentication-Results: mail.example.test;\r\n spf=pass\r\n", False),
    (b"Authentication-Results : mail.example.test; spf=pass\n", False),
    (b"Authentication-Results: mx.google.test; spf=pass\n", True),
    (b"Authentication-Results: evil-mail.example.test; spf=pass\n", True),
    (b"Authentication-Results: mail.example.test.evil; spf=pass\n", True),
    (b"Authentication-Results: (mail.example.test) other.test; spf=pass\n", True),
    (b"X-Authentication-Results: mail.example.test; spf=pass\n", True),
    (b"ARC-Authentication-Results: i=1; mail.example.test; spf=pass\n", True),
])
def test_strip_forged_results(header, kept):
    before = b"Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\nFrom: a@x.test\n"
    after = b"Subject: hi\n \tfolded subject\n"
    data = before + header + after + b"\n" + BODY
    expected = data if kept else before + after + b"\n" + BODY
    assert strip_forged_results(data, HOSTNAME) == expected


def test_strip_forged_results_removes_every_claim_and_keeps_the_rest_in_order():
    data = (
        b"Authentication-Results: mail.example.test; spf=pass\r\n"
        b"Authentication-Results: mx.other.test; dkim=fail\r\n"
        b"Subject: x\r\n"
        b"Authentication-Results: mail.example.test;\r\n dmarc=pass\r\n"
        b"\r\n" + BODY
    )
    assert strip_forged_results(data, "Mail.Example.Test") == (
        b"Authentication-Results: mx.other.test; dkim=fail\r\nSubject: x\r\n\r\n" + BODY
    )


def test_strip_forged_results_without_a_body_and_when_nothing_matches():
    assert strip_forged_results(b"Authentication-Results: mail.example.test; none\n", HOSTNAME) == b""
    untouched = b"Subject: x\r\n\r\nAuthentication-Results: mail.example.test; none\r\n"
    assert strip_forged_results(untouched, HOSTNAME) is untouched


def test_the_header_we_add_is_not_stripped_by_us_from_other_hosts_view(check):
    # What we add names us: a later hop with our hostname would strip it, any other keeps it.
    verdict = check()
    added = f"Authentication-Results: {verdict.header}\n".encode() + message()
    assert strip_forged_results(added, HOSTNAME) == message()
    assert strip_forged_results(added, "mx.other.test") == added


def test_a_non_ip_client_is_a_caller_error(check):
    with pytest.raises(ValueError):
        check(client_ip="mx.helo.test")

