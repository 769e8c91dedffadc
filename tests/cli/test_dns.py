"""`mailhost dns DOMAIN` (mailhost.cli.dns): the records to publish, ready to paste."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailhost.authn.dkim import generate
from mailhost.cli.main import main
from mailhost.config import load
from mailhost.doors.http.mta_sts import policy_id, policy_text

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"
[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"
{http}
[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
[[domain]]
name = "other.test"
maildir = "mail/other.test"
users = "users"
{extra}
"""


def setup(tmp_path: Path, http: str = '[http]\nendpoint = "tcp:8443:interface=127.0.0.1"', extra: str = "") -> Path:
    path = tmp_path / "mailhost.toml"
    path.write_text(CONFIG.format(http=http, extra=extra))
    return path


def run(path: Path, domain: str, capsys) -> tuple[int, str, str]:
    code = main(["--config", str(path), "dns", domain])
    out, err = capsys.readouterr()
    return code, out, err


def txt_value(out: str, name: str) -> str:
    """The joined strings of the TXT record for `name`, as a resolver hands them over."""
    [line] = [l for l in out.splitlines() if l.startswith(name + "\tIN TXT\t")]
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
    assert all(len(s.encode()) <= 255 for s in strings)  # RFC 1035 3.3
    return "".join(strings)


def test_every_record(tmp_path, capsys):
    path = setup(tmp_path)
    _, rsa_record = generate(tmp_path / "state", "example.test", "s1")
    code, out, err = run(path, "Example.TEST", capsys)
    assert code == 0 and err == ""
    assert "example.test.\tIN MX\t10 mail.example.test." in out
    assert "mail.example.test.\tIN A" in out and "mail.example.test.\tIN AAAA" in out  # advice, commented
    assert txt_value(out, "example.test.") == "v=spf1 mx -all"
    assert txt_value(out, "s1._domainkey.example.test.") == rsa_record  # split in strings of <= 255
    assert txt_value(out, "_dmarc.example.test.") == "v=DMARC1; p=none; rua=mailto:postmaster@example.test"
    policy = policy_id(policy_text(load(path)))
    assert txt_value(out, "_mta-sts.example.test.") == f"v=STSv1; id={policy}"
    assert "mta-sts.example.test.\tIN CNAME\tmail.example.test." in out
    assert "forward 443" in out  # the listener is on 8443; senders fetch from 443
    assert txt_value(out, "_smtp._tls.example.test.") == "v=TLSRPTv1; rua=mailto:postmaster@example.test"
    assert "; PTR:" in out
    # Everything else is a comment: pastable as it is.
    for line in out.splitlines():
        assert not line or line.startswith(";") or re.match(r"\S+\.\tIN (MX|TXT|CNAME)\t", line), line


def test_every_key_present_configured_and_generated(tmp_path, capsys):
    state = tmp_path / "state"
    _, ed_record = generate(state, "other.test", "ed", "ed25519-sha256")
    key_file, rsa_record = generate(state, "example.test", "old")
    extra = f'[[dkim]]\ndomain = "other.test"\nselector = "cfg"\nkey_file = "{key_file}"'
    code, out, _ = run(setup(tmp_path, extra=extra), "other.test", capsys)
    assert code == 0
    assert txt_value(out, "ed._domainkey.other.test.") == ed_record
    assert txt_value(out, "cfg._domainkey.other.test.") == rsa_record


def test_no_key_and_no_http_listener_say_what_to_do(tmp_path, capsys):
    code, out, _ = run(setup(tmp_path, http=""), "other.test", capsys)
    assert code == 0
    assert "mailhost dkim keygen other.test" in out
    assert "no [http] endpoint" in out and "\n_mta-sts." not in out and "\nmta-sts." not in out


def test_mta_sts_id_follows_the_policy(tmp_path, capsys):
    first = txt_value(run(setup(tmp_path), "example.test", capsys)[1], "_mta-sts.example.test.")
    second = txt_value(run(setup(tmp_path, extra='[mta_sts]\nmode = "enforce"'), "example.test", capsys)[1],
                       "_mta-sts.example.test.")
    assert first != second


def test_a_domain_that_is_not_ours(tmp_path, capsys):
    code, out, err = run(setup(tmp_path), "elsewhere.test", capsys)
    assert code == 1 and out == ""
    assert err == "mailhost: elsewhere.test is not a local domain (local domains: example.test, other.test)\n"
