"""Our own MTA-STS policy over the real HTTPS listener, and `mailhost dns` for the real daemon:
the DKIM record it prints verifies the signature on mail the daemon sent."""

from __future__ import annotations

import http.client
import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import dkim

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import wait_for
from tests.support.peers import Sink, make_ca_and_cert

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 86400\r\n"


def test_policy_served_over_https_per_host(make_daemon, tmp_path: Path):
    http_port = free_port()
    daemon = make_daemon(start=False, extra=f'[http]\nendpoint = "tcp:{http_port}:interface=127.0.0.1"\n'
                                            '[mta_sts]\nmode = "enforce"\nmax_age = "1d"\n')
    # A certificate for mta-sts.example.test from a private CA, where the generated pair would go:
    # senders verify it (RFC 8461 3.3).
    ca, cert, key = make_ca_and_cert(tmp_path / "pki", "mta-sts.example.test")
    tls = daemon.root / "state" / "tls"
    tls.mkdir(parents=True)
    shutil.copy(cert, tls / "cert.pem")
    shutil.copy(key, tls / "key.pem")
    daemon.start()

    url = f"https://mta-sts.example.test:{http_port}/.well-known/mta-sts.txt"
    result = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(ca), "--resolve",
                             f"mta-sts.example.test:{http_port}:127.0.0.1", "-D", "-", url],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\ncontent-type: text/plain\r\n" in head.lower() + b"\r\n"
    assert body == POLICY

    # Another Host (not one of our domains, or not an mta-sts. name): 404, from Python's client.
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    for host in ("mta-sts.elsewhere.test", f"mail.example.test:{http_port}"):
        connection = http.client.HTTPSConnection("127.0.0.1", http_port, context=context, timeout=10)
        connection.request("GET", "/.well-known/mta-sts.txt", headers={"Host": host})
        answer = connection.getresponse()
        assert answer.status == 404 and POLICY not in answer.read()
        connection.close()


def txt_records(output: str) -> dict[str, str]:
    """name -> joined TXT strings, from zone-file lines."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(\S+)\.\tIN TXT\t(.*)$", line)
        if match:
            found[match.group(1)] = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2)))
    return found


def test_mailhost_dns_prints_records_whose_dkim_key_verifies_our_mail(make_daemon, tmp_path: Path):
    sink = Sink(tmp_path / "sink", address="127.0.0.1")
    http_port = free_port()
    daemon = make_daemon(start=False, extra=f'[[relay.smarthost]]\nhost = "127.0.0.1"\nport = {sink.port}\ntls = "none"\n'
                                            f'[http]\nendpoint = "tcp:{http_port}:interface=127.0.0.1"\n')
    try:
        daemon.cli("dkim", "keygen", "example.test", "--selector", "s1")
        daemon.start()
        output = daemon.cli("dns", "example.test").stdout
        records = txt_records(output)
        assert "example.test.\tIN MX\t10 mail.example.test." in output
        assert records["example.test"] == "v=spf1 mx -all"
        assert records["_dmarc.example.test"].startswith("v=DMARC1; p=none; rua=mailto:")
        assert re.fullmatch(r"v=STSv1; id=[A-Za-z0-9]{1,32}", records["_mta-sts.example.test"])
        assert records["_smtp._tls.example.test"].startswith("v=TLSRPTv1; rua=mailto:")
        assert "mta-sts.example.test.\tIN CNAME\tmail.example.test." in output

        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.sendmail("alice@example.test", ["bob@remote.test"],
                            b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: signed\r\n\r\nhi\r\n")
        [got] = wait_for(sink.messages, what="delivery to the smart host")
        wire = got["data"].encode("latin-1")
        assert b"DKIM-Signature:" in wire

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            return records.get(name.decode().rstrip("."), "").encode()

        assert dkim.verify(wire, dnsfunc=dnsfunc)

        refused = daemon.cli("dns", "elsewhere.test", check=False)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [
            "mailhost: elsewhere.test is not a local domain (local domains: example.test, other.test)"]
    finally:
        sink.stop()
