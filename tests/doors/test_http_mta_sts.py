"""/.well-known/mta-sts.txt (mailhost.doors.http.mta_sts), spoken to in raw HTTP/1.1
(the TLS around it is tests/e2e/test_dns_and_policy.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhost.config import load
from mailhost.doors.http.mta_sts import policy_domain, policy_id, policy_text, well_known
from mailhost.doors.http.site import make_site

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"
[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"
[[domain]]
name = "example.test"
maildir = "mail"
users = "users"
[[domain]]
name = "other.test"
maildir = "mail"
users = "users"
{extra}
"""


def config(tmp_path: Path, extra: str = ""):
    path = tmp_path / "mailhost.toml"
    path.write_text(CONFIG.format(extra=extra))
    return load(path)


def request(tmp_path: Path, host: str | None, path: str = "/.well-known/mta-sts.txt", extra: str = ""):
    loaded = config(tmp_path, extra)
    site = make_site({b".well-known": well_known(lambda: loaded)})
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    protocol = site.buildProtocol(None)
    protocol.makeConnection(transport)
    host_line = f"Host: {host}\r\n" if host is not None else ""
    protocol.dataReceived(f"GET {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n".encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    protocol.connectionLost(None)
    return int(lines[0].split()[1]), headers, body


def test_policy_for_each_local_domain(tmp_path):
    for host in ("mta-sts.example.test", "MTA-STS.Other.Test:8443", "mta-sts.example.test."):
        code, headers, body = request(tmp_path, host)
        assert code == 200 and headers["content-type"] == "text/plain"
        assert body == b"version: STSv1\r\nmode: testing\r\nmx: mail.example.test\r\nmax_age: 604800\r\n"


@pytest.mark.parametrize("host, path", [
    ("mta-sts.elsewhere.test", "/.well-known/mta-sts.txt"),  # not ours
    ("mail.example.test", "/.well-known/mta-sts.txt"),  # not an mta-sts. name
    ("mta-sts.", "/.well-known/mta-sts.txt"),
    ("[::1]:8443", "/.well-known/mta-sts.txt"),
    (None, "/.well-known/mta-sts.txt"),
    ("mta-sts.example.test", "/.well-known/mta-sts.txt/more"),
    ("mta-sts.example.test", "/.well-known/"),
    ("mta-sts.example.test", "/.well-known/other"),
])
def test_404_for_anything_else(tmp_path, host, path):
    assert request(tmp_path, host, path)[0] == 404


def test_configured_mode_mx_and_max_age(tmp_path):
    extra = '[mta_sts]\nmode = "enforce"\nmax_age = "1d"\nmx = ["mx1.example.test", "*.backup.example.net"]'
    body = request(tmp_path, "mta-sts.example.test", extra=extra)[2].decode()
    assert body.split("\r\n") == ["version: STSv1", "mode: enforce", "mx: mx1.example.test",
                                  "mx: *.backup.example.net", "max_age: 86400", ""]


def test_the_id_changes_with_the_policy(tmp_path):
    first = policy_id(policy_text(config(tmp_path)))
    second = policy_id(policy_text(config(tmp_path, '[mta_sts]\nmode = "enforce"')))
    assert first != second and first.isalnum() and len(first) <= 32  # RFC 8461 3.1
    assert policy_id(policy_text(config(tmp_path))) == first


@pytest.mark.parametrize("extra, key", [
    ('[mta_sts]\nmode = "strict"', "mta_sts.mode"),
    ('[mta_sts]\nmax_age = "400d"', "mta_sts.max_age"),
    ('[mta_sts]\nmx = ["bad name!"]', "mta_sts.mx"),
    ('[mta_sts]\nmx = "mail.example.test"', "mta_sts.mx"),
    ('[mta_sts]\nnope = 1', "mta_sts.nope"),
    ('[srs]\nmax_age = "36h"', "srs.max_age"),
    ('[srs]\nenabled = "yes"', "srs.enabled"),
])
def test_bad_keys_name_themselves(tmp_path, extra, key):
    from mailhost.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(tmp_path, extra)


def test_policy_domain():
    assert policy_domain(b"mta-sts.Example.TEST:443") == "example.test"
    assert policy_domain(b"mta-sts.\xff") is None and policy_domain(b"") is None
