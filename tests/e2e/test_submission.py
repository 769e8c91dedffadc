"""Submission: real clients (msmtp, smtplib, nmap) against the real daemon's submission, submissions and mx roles.

Two daemons are shared by the module: `daemon` (relay.networks is only
127.0.0.1, so 127.0.0.2 is an outsider) and `strict` (relay.networks names no
loopback address at all, and [submission] hide_client is on). Tests that count
AUTH failures bind their own source address, so they slow down no one else.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import Daemon, RawSession, free_port
from tests.e2e.test_sending import wait_for
from tests.support.dns import DNSServer
from tests.support.peers import Sink, make_self_signed

# Module-scoped daemons, tests written to run in order: one test runner takes them all.
pytestmark = pytest.mark.xdist_group("submission")

PASSWORD = "s3cret-pass"  # what Daemon.seed_users gives everyone
MX_PORT = free_port()
ZONE = [("remote.test", "MX", "10 mx1.remote.test"), ("mx1.remote.test", "A", "127.0.0.5")]
USERS = ["alice@example.test", "bob@example.test", "carol@other.test", "news@example.test", "dave@example.test"]

# The classic open-relay probes (the list), each refused for an anonymous outsider.
PROBES = [
    '"u@remote.test"@example.test',
    "u%remote.test@example.test",
    "u%remote.test@[127.0.0.1]",
    "remote.test!u",
    "@example.test:u@remote.test",
    "u@remote.test@example.test",
    "u@[127.0.0.2]",
    "u@remote.test",
]


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def start_daemon(root: Path, dns: DNSServer, **options) -> Daemon:
    daemon = Daemon(root, submission=True, extra=f'nameservers = ["{dns.nameserver}"]\nmx_port = {MX_PORT}\n'
                    '[queue]\nretry = ["1s"]\n', **options)
    daemon.seed_users(USERS)
    daemon.cli("user", "may-send-as", "news@example.test", "info@example.test", "@campaign.test")
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    sink = Sink(tmp_path_factory.mktemp("mx1"), address="127.0.0.5", port=MX_PORT)
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer, mx: Sink) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("submission"), dns, relay_networks='["127.0.0.1/32"]')
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer, mx: Sink) -> Iterator[Daemon]:
    # 10.255.255.255 is only a config value: nothing is ever sent there.
    daemon = start_daemon(tmp_path_factory.mktemp("strict"), dns, relay_networks='["10.255.255.255/32"]',
                          prelude="[submission]\nhide_client = true\n")
    yield daemon
    daemon.stop()


def message(subject: str, sender: str = "alice@example.test", to: str = "bob@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hello.\n")
    return msg


def sink_messages(mx: Sink, subject: str) -> list[dict]:
    return [m for m in mx.messages() if f"Subject: {subject}\r\n" in m["data"]]


def msmtp(daemon: Daemon, port: int, rcpts: list[str], raw: bytes, auth: str, starttls: bool,
          password: str = PASSWORD) -> subprocess.CompletedProcess:
    binary = shutil.which("msmtp")
    assert binary, "msmtp is installed by tests/ensure-peers"
    config = daemon.root / f"msmtprc-{port}-{auth}"
    config.write_text(
        f"account default\nhost 127.0.0.1\nport {port}\nfrom alice@example.test\ndomain client.test\n"
        f"auth {auth}\nuser alice@example.test\npassword {password}\n"
        f"tls on\ntls_starttls {'on' if starttls else 'off'}\ntls_certcheck off\n"
    )
    os.chmod(config, 0o600)  # msmtp refuses a readable file that holds a password
    return subprocess.run([binary, "-C", str(config), *rcpts], input=raw, capture_output=True, timeout=30)


def tls_session(port: int, source: str | None = None) -> RawSession:
    """A raw session inside implicit TLS (the submissions role)."""
    session = RawSession(port, source=source, greeting=False)
    session.sock = no_verify().wrap_socket(session.sock, server_hostname="mail.example.test")
    assert session.reply().startswith("220")
    return session


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- 587 and 465 with real clients ------------------------------------------------


def test_msmtp_starttls_auth_plain_to_local_and_remote(daemon: Daemon, mx: Sink) -> None:
    raw = b"From: alice@example.test\nTo: bob@example.test, dave@remote.test\nSubject: via msmtp\n\nHello.\n"
    result = msmtp(daemon, daemon.submission_port, ["bob@example.test", "dave@remote.test"], raw, "plain", starttls=True)
    assert result.returncode == 0, result.stderr.decode()
    [local] = [m for m in daemon.messages("bob") if m["Subject"] == "via msmtp"]
    assert "with ESMTPSA id" in local["Received"] and "(authenticated as alice@example.test)" in local["Received"]
    assert local["Message-ID"] and local["Date"]
    [remote] = wait_for(lambda: sink_messages(mx, "via msmtp"), what="delivery to the remote MX")
    assert remote["rcpt_to"] == ["dave@remote.test"] and remote["mail_from"] == "alice@example.test"
    assert "with ESMTPSA id" in remote["data"]


def test_smtplib_starttls_auth_login_to_local_and_remote(daemon: Daemon, mx: Sink) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10) as client:
        client.starttls(context=no_verify())
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.user, client.password = "alice@example.test", PASSWORD
        # No initial response: the server asks for the user name, then the password.
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        # Raw, without Message-ID and Date: mailhost adds them (RFC 6409 8).
        raw = b"From: alice@example.test\r\nSubject: via smtplib\r\n\r\nHello.\r\n"
        assert client.sendmail("alice@example.test", ["bob@example.test", "erin@remote.test"], raw) == {}
    [local] = [m for m in daemon.messages("bob") if m["Subject"] == "via smtplib"]
    assert local["Message-ID"].endswith("@mail.example.test>") and local["Date"]
    assert "with ESMTPSA id" in local["Received"] and "[127.0.0.1]" in local["Received"]
    [remote] = wait_for(lambda: sink_messages(mx, "via smtplib"), what="delivery to the remote MX")
    assert remote["rcpt_to"] == ["erin@remote.test"] and "Message-ID: <" in remote["data"]


def test_implicit_tls_smtplib_and_msmtp(daemon: Daemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=no_verify(), timeout=10) as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.login("alice@example.test", PASSWORD)
        client.send_message(message("over 465"), to_addrs=["bob@example.test"])
    raw = b"From: alice@example.test\nSubject: msmtp over 465\n\nHello.\n"
    result = msmtp(daemon, daemon.submissions_port, ["bob@example.test"], raw, "login", starttls=False)
    assert result.returncode == 0, result.stderr.decode()
    received = {m["Subject"]: m["Received"] for m in daemon.messages("bob")}
    for subject in ("over 465", "msmtp over 465"):
        assert "with ESMTPSA id" in received[subject] and "(authenticated as alice@example.test)" in received[subject]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_is_refused(daemon: Daemon) -> None:
    # This client can speak TLS 1.1 (checked against a server that allows it): the refusal is mailhost's.
    context = no_verify()
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=context, timeout=10).quit()


# --- refusals -------------------------------------------------------------------


def test_auth_before_tls_is_refused(daemon: Daemon) -> None:
    session = RawSession(daemon.submission_port)
    ehlo = session.command("EHLO client.test")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert session.command(f"AUTH PLAIN {plain('alice@example.test', PASSWORD)}").startswith("538 5.7.11")
    assert session.command("MAIL FROM:<alice@example.test>").startswith("530 5.7.0")
    session.close()


def test_bad_password(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10, source_address=("127.0.0.3", 0)) as client:
        client.starttls(context=no_verify())
        client.ehlo()
        client.user, client.password = "alice@example.test", "wrong-pass"
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.auth("PLAIN", client.auth_plain)
        assert caught.value.smtp_code == 535 and caught.value.smtp_error.startswith(b"5.7.8")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: no\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530


def test_lockout_after_the_failures(daemon: Daemon) -> None:
    session = tls_session(daemon.submissions_port, source="127.0.0.4")
    session.command("EHLO client.test")
    bad = f"AUTH PLAIN {plain('alice@example.test', 'guess')}"
    assert session.command(bad).startswith("535 5.7.8")
    assert session.command(bad).startswith("535 5.7.8")
    assert session.command(bad).startswith("535 5.7.8")  # limits.auth_failures = 3 ...
    assert session.reply().startswith("421 4.7.0")  # ... then 421 and the connection is closed
    assert session.closed()
    assert "auth failed client=[127.0.0.4]" in daemon.log()


def test_ten_logins_at_once_all_succeed_and_a_wrong_one_among_them_is_refused(daemon: Daemon) -> None:
    # A campaign tool opening its connections together, all with one account (one scrypt serves them:
    # tests/smtp/test_server_auth.py counts the checks); a guess arrives in the same burst.
    start = threading.Barrier(11)

    def login(password: str, source: str) -> int:
        with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=30, source_address=(source, 0)) as client:
            client.starttls(context=no_verify())
            client.ehlo()
            client.user, client.password = "news@example.test", password
            start.wait(timeout=30)
            try:
                return client.auth("PLAIN", client.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as error:
                return error.smtp_code

    with ThreadPoolExecutor(11) as pool:
        right = [pool.submit(login, PASSWORD, "127.0.0.1") for _ in range(10)]
        wrong = pool.submit(login, "campaign-guess", "127.0.0.12")
        assert [f.result() for f in right] == [235] * 10
        assert wrong.result() == 535
    assert "auth failed client=[127.0.0.12]" in daemon.log()


def test_sending_as_someone_else_is_refused(daemon: Daemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=no_verify(), timeout=10) as client:
        client.login("alice@example.test", PASSWORD)
        code, text = client.mail("bob@example.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        client.rset()
        for sender in ("alice+lists@example.test", "team@example.test", "<>"):  # her own, an alias of hers, null
            assert client.mail(sender)[0] == 250, sender
            client.rset()
        # The envelope is hers, the From: header is bob's.
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.send_message(message("forged", sender="Bob <bob@example.test>"), from_addr="alice@example.test",
                                to_addrs=["bob@example.test"])
        assert (caught.value.smtp_code, caught.value.smtp_error[:5]) == (553, b"5.7.1")
    assert not [m for m in daemon.messages("bob") if m["Subject"] == "forged"]


def test_obsolete_header_syntax_does_not_hide_someone_elses_from(daemon: Daemon) -> None:
    # "From :" (RFC 5322 4.5) is a From: field to mail readers; the stdlib's compat32 parser did not see it.
    raw = b"From : bob@example.test\r\nTo: bob@example.test\r\nSubject: obsolete forged\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10) as client:
        client.starttls(context=no_verify())
        client.login("alice@example.test", PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail("alice@example.test", ["bob@example.test"], raw)
        assert (caught.value.smtp_code, caught.value.smtp_error[:5]) == (553, b"5.7.1")
        assert b"From: <bob@example.test> not owned by alice@example.test" in caught.value.smtp_error
        # Her own address in the same syntax goes through on the same session.
        own = raw.replace(b"bob@example.test\r\nTo", b"alice@example.test\r\nTo").replace(b"forged", b"own")
        assert client.sendmail("alice@example.test", ["bob@example.test"], own) == {}
    subjects = [m["Subject"] for m in daemon.messages("bob")]
    assert "obsolete own" in subjects and "obsolete forged" not in subjects


def test_may_send_as_widens_a_campaign_account(daemon: Daemon, mx: Sink) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=no_verify(), timeout=10) as client:
        client.login("news@example.test", PASSWORD)
        client.send_message(message("newsletter", sender="info@example.test", to="subscriber@remote.test"))
        client.send_message(message("campaign", sender="offers@campaign.test", to="bob@example.test"))
        assert client.mail("alice@example.test")[0] == 553
    wait_for(lambda: sink_messages(mx, "newsletter"), what="the newsletter at the remote MX")
    assert [m for m in daemon.messages("bob") if m["Subject"] == "campaign"]


def test_open_relay_probes_refused_on_mx_from_outside(daemon: Daemon) -> None:
    outsider = RawSession(daemon.port, source="127.0.0.2")  # relay.networks lists only 127.0.0.1
    ehlo = outsider.command("EHLO client.test")
    assert "AUTH" not in ehlo
    assert outsider.command(f"AUTH PLAIN {plain('alice@example.test', PASSWORD)}").startswith("502")
    for sender in ("<>", "<alice@example.test>", "<someone@remote.test>"):
        assert outsider.command(f"MAIL FROM:{sender}").startswith("250")
        for probe in PROBES:
            reply = outsider.command(f"RCPT TO:<{probe}>")
            assert reply[:1] in ("5",), (sender, probe, reply)
        assert outsider.command("DATA").startswith("554 5.5.1")  # no valid recipients: nothing to send
        outsider.command("RSET")
    outsider.close()
    # The same probes on the submission port without AUTH get no further than 530.
    session = RawSession(daemon.submission_port, source="127.0.0.2")
    session.command("EHLO client.test")
    assert session.command("MAIL FROM:<>").startswith("530 5.7.0")
    assert session.command("RCPT TO:<u@remote.test>").startswith("530 5.7.0")
    session.close()
    # Control: the listed network may relay, so the refusals above are about the outsider.
    insider = RawSession(daemon.port)
    insider.command("EHLO client.test")
    insider.command("MAIL FROM:<>")
    assert insider.command("RCPT TO:<u@remote.test>").startswith("250")
    insider.close()
    assert daemon.cli("queue", "list", "--json").stdout.count('"id"') == 0


def test_nmap_finds_no_open_relay(strict: Daemon) -> None:
    nmap = shutil.which("nmap")
    assert nmap, "nmap is installed by tests/ensure-peers"
    # "+" runs the script on this port although it is not 25/465/587.
    result = subprocess.run([nmap, "-Pn", "-n", "-sT", "-p", str(strict.port), "--script", "+smtp-open-relay",
                             "127.0.0.1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "smtp-open-relay: Server doesn't seem to be an open relay, all tests failed" in result.stdout, result.stdout
    assert "Relay access denied" in strict.log()


# --- hide_client and SIGHUP ------------------------------------------------------


def test_hide_client_leaves_the_address_out_of_received(strict: Daemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", strict.submissions_port, context=no_verify(), timeout=10) as client:
        client.ehlo("laptop.internal")
        client.login("alice@example.test", PASSWORD)
        client.send_message(message("hidden"))
    [msg] = [m for m in strict.messages("bob") if m["Subject"] == "hidden"]
    [ours] = msg.get_all("Received")
    assert ours.startswith("by mail.example.test (mailhost) with ESMTPSA id")
    assert "127.0.0.1" not in ours and "laptop.internal" not in ours
    assert "(authenticated as alice@example.test)" in ours


def peer_common_name(port: int) -> str:
    """The common name on the certificate a new TLS connection to `port` is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain_socket:
        with no_verify().wrap_socket(plain_socket, server_hostname="mail.example.test") as sock:
            der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_sighup_reloads_password_and_certificate_without_dropping_sessions(strict: Daemon, tmp_path: Path) -> None:
    user = "dave@example.test"
    open_session = smtplib.SMTP_SSL("127.0.0.1", strict.submissions_port, context=no_verify(), timeout=10)
    open_session.login(user, PASSWORD)  # a success the daemon now remembers for a few minutes ...
    assert peer_common_name(strict.submissions_port) == "mail.example.test"

    strict.cli("user", "passwd", user, "--password-stdin", input="brand-new-pass\n")
    cert, key = make_self_signed(tmp_path, "renewed.example.test")
    shutil.copy(cert, strict.root / "state/tls/cert.pem")
    shutil.copy(key, strict.root / "state/tls/key.pem")
    strict.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: TLS pair" in strict.log(), what="the reload")

    assert peer_common_name(strict.submissions_port) == "renewed.example.test"
    with smtplib.SMTP_SSL("127.0.0.1", strict.submissions_port, context=no_verify(), timeout=10) as client:
        client.ehlo()  # smtplib's auth() does not say EHLO itself (and takes a 503 for success)
        client.user, client.password = user, PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError):  # ... but not past a password change
            client.auth("PLAIN", client.auth_plain)
    with smtplib.SMTP("127.0.0.1", strict.submission_port, timeout=10) as client:
        client.starttls(context=no_verify())
        client.login(user, "brand-new-pass")
    # The session opened before the reload is still there, still authenticated.
    open_session.send_message(message("after reload", sender=user))
    open_session.quit()
    assert [m for m in strict.messages("bob") if m["Subject"] == "after reload"]
    assert strict.process.poll() is None


def test_no_password_in_the_logs(daemon: Daemon, strict: Daemon) -> None:
    # One good and one bad login of its own: the test must not depend on which others ran first.
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10, source_address=("127.0.0.9", 0)) as client:
        client.starttls(context=no_verify())
        client.login("alice@example.test", PASSWORD)
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10, source_address=("127.0.0.9", 0)) as client:
        client.starttls(context=no_verify())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice@example.test", "wrong-pass")
    wait_for(lambda: "auth failed" in daemon.log(), what="the failed login in the log")
    text = daemon.log() + strict.log()
    assert "auth ok" in text and "auth failed" in text
    for secret in (PASSWORD, "wrong-pass", "guess", "brand-new-pass", plain("alice@example.test", PASSWORD)):
        assert secret not in text
