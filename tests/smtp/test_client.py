"""The outbound SMTP client against a programmable sink.

Each scenario runs the client in its own process (tests/support/client_driver.py:
the Twisted reactor cannot be restarted inside pytest) against the sink
(tests/support/sink.py), and checks both what the client reports and what the
sink saw on the wire. The reply parser is also checked in-process, on a
StringTransport with a fake clock.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailhost.smtp.client import SessionError, SMTPClientProtocol, message_size, parse_extensions
from mailhost.smtp.wire import Reply, stuff_from_lf
from tests.support.peers import PROJECT, Sink, make_ca_and_cert, make_self_signed

MX = "mx1.remote.test"
ADDRESS = "127.0.0.5"


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator:
    sinks: list[Sink] = []

    def make(**options: Any) -> Sink:
        options.setdefault("address", ADDRESS)
        sink = Sink(tmp_path / f"sink{len(sinks)}", **options)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """ca.pem, and cert.pem + key.pem for mx1.remote.test signed by it."""
    return make_ca_and_cert(tmp_path_factory.mktemp("ca"), MX)


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("self-signed"), MX)


def drive(sink: Sink | None, port: int | None = None, **spec: Any) -> dict[str, Any]:
    """Run the client once in a fresh process; its JSON report."""
    spec = {"host": MX, "address": ADDRESS, "port": port if sink is None else sink.port, **spec}
    for message in spec.get("messages", []):
        if isinstance(message.get("data"), bytes):
            message["data"] = message["data"].decode("latin-1")
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.client_driver"], input=json.dumps(spec),
        cwd=PROJECT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def message(recipients: list[str], data: bytes | str = b"Subject: test\n\nHello.\n", sender: str = "alice@example.test", **flags: Any) -> dict[str, Any]:
    return {"sender": sender, "recipients": recipients, "data": data, **flags}


def codes(send: dict[str, Any]) -> dict[str, int]:
    return {rcpt: reply["code"] for rcpt, reply in send["replies"].items()}


def verbs(sink: Sink) -> list[str]:
    return [line.split(" ")[0].split(":")[0].upper() for line in sink.lines()]


def free_port(address: str = ADDRESS) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# --- delivery ----------------------------------------------------------------


def test_two_messages_over_one_connection(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, messages=[message(["bob@remote.test"], "Subject: one\n\nFirst.\n"),
                                   message(["carol@remote.test", "dave@remote.test"], "Subject: two\n\nSecond.\n")])
    assert result["open"]["ok"] and result["open"]["peer"] == f"{MX}[{ADDRESS}]:{sink.port}"
    assert [codes(send) for send in result["sends"]] == [{"bob@remote.test": 250}, {"carol@remote.test": 250, "dave@remote.test": 250}]
    assert result["usable"] == [True, True]
    messages = sink.messages()
    assert [m["rcpt_to"] for m in messages] == [["bob@remote.test"], ["carol@remote.test", "dave@remote.test"]]
    assert [m["data"] for m in messages] == ["Subject: one\r\n\r\nFirst.\r\n", "Subject: two\r\n\r\nSecond.\r\n"]
    assert {entry["conn"] for entry in sink.commands()} == {1}
    assert verbs(sink).count("EHLO") == 1 and verbs(sink)[-1] == "QUIT"


def test_reset_between_messages(make_sink) -> None:
    sink = make_sink(script=[{"when": "RSET", "reply": "500 5.5.1 no", "every": 2}])
    result = drive(sink, messages=[message(["a@remote.test"], reset_first=True), message(["b@remote.test"], reset_first=True),
                                   message(["c@remote.test"], reset_first=True)])
    assert codes(result["sends"][0]) == {"a@remote.test": 250}
    # A refused RSET leaves the server's state unknown: the session is over.
    assert "refused RSET: 500 5.5.1 no" in result["sends"][1]["error"]["reason"]
    assert "cannot be used" in result["sends"][2]["error"]["reason"]
    assert result["usable"] == [True, False, False]
    assert verbs(sink).count("RSET") == 2
    assert [m["rcpt_to"] for m in sink.messages()] == [["a@remote.test"]]


def test_pipelining_sends_the_envelope_in_one_write(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, messages=[message(["a@remote.test", "b@remote.test", "c@remote.test"])])
    assert set(codes(result["sends"][0]).values()) == {250}
    batches = {entry["line"].split(" ")[0].split(":")[0]: entry["batch"] for entry in sink.commands()}
    group = [entry["batch"] for entry in sink.commands() if entry["line"].split(" ")[0] in ("MAIL", "RCPT", "DATA")]
    assert len(group) == 5 and len(set(group)) == 1, sink.commands()
    assert batches["EHLO"] != group[0]


def test_the_next_message_is_pipelined_behind_the_end_of_data(make_sink) -> None:
    sink = make_sink()
    bodies = [f"Subject: chained {n}\n\nBody {n}.\n" for n in range(4)]
    result = drive(sink, chain=True, messages=[message([f"r{n}@remote.test"], body) for n, body in enumerate(bodies)])
    assert "unchained" not in result
    assert [codes(send) for send in result["sends"]] == [{f"r{n}@remote.test": 250} for n in range(4)]
    assert result["usable"] == [True]
    received = sink.messages()
    assert [m["rcpt_to"] for m in received] == [[f"r{n}@remote.test"] for n in range(4)]
    assert [m["data"] for m in received] == [b.replace("\n", "\r\n") for b in bodies]
    # RFC 2920 3.1: the body and its dot, then the next MAIL, RCPT and DATA, in one write.
    mails = [entry["batch"] for entry in sink.commands() if entry["line"].startswith("MAIL")]
    assert [m["end_batch"] for m in received[:-1]] == mails[1:]


def test_nothing_is_pipelined_behind_the_end_of_data_without_pipelining(make_sink) -> None:
    sink = make_sink(no_pipelining=True)
    result = drive(sink, chain=True, messages=[message([f"r{n}@remote.test"]) for n in range(2)])
    assert result["unchained"] is True  # the second waited for the first's final reply
    assert [codes(send) for send in result["sends"]] == [{"r0@remote.test": 250}, {"r1@remote.test": 250}]


def test_no_pipelining_waits_for_each_reply(make_sink) -> None:
    sink = make_sink(no_pipelining=True)
    result = drive(sink, messages=[message(["a@remote.test", "b@remote.test"])])
    assert set(codes(result["sends"][0]).values()) == {250}
    group = [entry["batch"] for entry in sink.commands() if entry["line"].split(" ")[0] in ("MAIL", "RCPT", "DATA")]
    assert len(group) == 4 and len(set(group)) == 4, sink.commands()
    assert len(sink.messages()) == 1


def test_helo_fallback_without_esmtp(make_sink) -> None:
    sink = make_sink(no_esmtp=True)
    result = drive(sink, messages=[message(["bob@remote.test"])])
    assert result["open"]["extensions"] == {}
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert verbs(sink)[:3] == ["EHLO", "HELO", "MAIL"]
    assert sink.messages()[0]["mail_params"] == ""  # no SIZE to a server that did not offer it


# --- per-recipient results ---------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_recipient_gets_its_rcpt_reply(make_sink, pipelining: bool) -> None:
    sink = make_sink(no_pipelining=not pipelining,
                     script=[{"when": "RCPT", "match": "bob@", "reply": "550 5.1.1 no such user"}])
    result = drive(sink, messages=[message(["alice@remote.test", "bob@remote.test"])])
    replies = result["sends"][0]["replies"]
    assert replies["alice@remote.test"]["str"] == "250 2.0.0 Ok: queued"
    assert replies["bob@remote.test"]["code"] == 550 and replies["bob@remote.test"]["status"] == "5.1.1"
    assert replies["bob@remote.test"]["permanent"] is True
    assert [m["rcpt_to"] for m in sink.messages()] == [["alice@remote.test"]]


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_refused_applies_to_every_recipient(make_sink, pipelining: bool) -> None:
    sink = make_sink(no_pipelining=not pipelining, script=[{"when": "MAIL", "reply": "452 4.3.1 full", "times": 1}])
    result = drive(sink, messages=[message(["a@remote.test", "b@remote.test"]), message(["c@remote.test"])])
    first = result["sends"][0]["replies"]
    assert {rcpt: reply["str"] for rcpt, reply in first.items()} == {"a@remote.test": "452 4.3.1 full", "b@remote.test": "452 4.3.1 full"}
    assert all(reply["transient"] for reply in first.values())
    # The session stays in step: the next transaction on it goes through.
    assert codes(result["sends"][1]) == {"c@remote.test": 250}
    assert result["usable"] == [True, True]
    assert [m["rcpt_to"] for m in sink.messages()] == [["c@remote.test"]]


def test_data_end_refusal_goes_to_accepted_recipients(make_sink) -> None:
    sink = make_sink(script=[{"when": "RCPT", "match": "bob@", "reply": "550 5.1.1 unknown"},
                             {"when": "DATA_END", "reply": "554 5.7.1 rejected"}])
    result = drive(sink, messages=[message(["alice@remote.test", "bob@remote.test", "carol@remote.test"])])
    assert {rcpt: reply["str"] for rcpt, reply in result["sends"][0]["replies"].items()} == {
        "alice@remote.test": "554 5.7.1 rejected", "bob@remote.test": "550 5.1.1 unknown", "carol@remote.test": "554 5.7.1 rejected",
    }
    assert sink.messages() == []


def test_no_recipient_accepted_sends_no_body(make_sink) -> None:
    # RFC 2920 3.1: a server may accept DATA with no recipient; only a dot may follow.
    sink = make_sink(script=[{"when": "RCPT", "reply": "550 5.1.1 unknown", "times": 2},
                             {"when": "DATA", "reply": "354 go ahead", "times": 1}])
    result = drive(sink, messages=[message(["x@remote.test", "y@remote.test"], "Subject: secret\n\nBody.\n"),
                                   message(["z@remote.test"])])
    assert codes(result["sends"][0]) == {"x@remote.test": 550, "y@remote.test": 550}
    assert codes(result["sends"][1]) == {"z@remote.test": 250}
    assert [m["rcpt_to"] for m in sink.messages()] == [["z@remote.test"]]
    assert not any("secret" in line for line in sink.lines())


def test_no_recipient_accepted_without_pipelining_skips_data(make_sink) -> None:
    sink = make_sink(no_pipelining=True, script=[{"when": "RCPT", "reply": "550 5.1.1 unknown"}])
    result = drive(sink, messages=[message(["x@remote.test"])])
    assert codes(result["sends"][0]) == {"x@remote.test": 550}
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]


def test_421_mid_transaction_answers_every_recipient(make_sink) -> None:
    sink = make_sink(script=[{"when": "RCPT", "match": "b@", "reply": "421 4.3.2 shutting down"}])
    result = drive(sink, messages=[message(["a@remote.test", "b@remote.test", "c@remote.test"])])
    assert set(codes(result["sends"][0]).values()) == {421}
    assert result["usable"] == [False]
    assert sink.messages() == []


def test_silent_server_times_out(make_sink) -> None:
    sink = make_sink(script=[{"when": "MAIL", "reply": None}])
    result = drive(sink, command_timeout=0.5, messages=[message(["a@remote.test"])])
    assert "timeout after 0.5s" in result["sends"][0]["error"]["reason"]
    assert result["usable"] == [False]


# --- TLS ---------------------------------------------------------------------


def test_opportunistic_starttls_with_self_signed_certificate(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, tls="opportunistic", messages=[message(["bob@remote.test"])])
    assert result["open"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert "STARTTLS" not in result["open"]["extensions"]  # the EHLO after TLS was read
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert sink.messages()[0]["tls"] is True
    assert [(entry["line"].split(" ")[0], entry["tls"]) for entry in sink.commands()][:4] == [
        ("EHLO", False), ("STARTTLS", False), ("EHLO", True), ("MAIL", True)]


def test_opportunistic_without_starttls_stays_plain(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, tls="opportunistic", messages=[message(["bob@remote.test"])])
    assert result["open"]["tls_version"] is None and sink.messages()[0]["tls"] is False


def test_required_tls_without_starttls_fails(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, tls="required", messages=[message(["bob@remote.test"])])
    error = result["open"]["error"]
    assert "STARTTLS" in error["reason"] and error["permanent"] is False
    assert "MAIL" not in verbs(sink)


def test_required_tls_with_self_signed_certificate(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, tls="required", messages=[message(["bob@remote.test"])])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250} and sink.messages()[0]["tls"] is True


def test_tls_none_never_sends_starttls(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, tls="none", messages=[message(["bob@remote.test"])])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert "STARTTLS" not in verbs(sink) and sink.messages()[0]["tls"] is False


def test_starttls_verify_with_trusted_ca(make_sink, ca) -> None:
    ca_pem, cert, key = ca
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, tls="starttls-verify", trust_root=str(ca_pem), messages=[message(["bob@remote.test"])])
    assert result["open"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert codes(result["sends"][0]) == {"bob@remote.test": 250} and sink.messages()[0]["tls"] is True


def test_starttls_verify_wrong_host_name_fails(make_sink, ca) -> None:
    ca_pem, cert, key = ca
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, host="mx2.remote.test", tls="starttls-verify", trust_root=str(ca_pem),
                   messages=[message(["bob@remote.test"])])
    error = result["open"]["error"]
    assert "TLS handshake with mx2.remote.test" in error["reason"] and "host name" in error["reason"]
    assert error["permanent"] is False
    assert "MAIL" not in verbs(sink) and sink.messages() == []


def test_starttls_verify_untrusted_certificate_fails(make_sink, ca, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key)
    result = drive(sink, tls="starttls-verify", trust_root=str(ca[0]), messages=[message(["bob@remote.test"])])
    assert "certificate verify failed" in result["open"]["error"]["reason"]
    assert "MAIL" not in verbs(sink)


def test_implicit_tls_verified(make_sink, ca) -> None:
    ca_pem, cert, key = ca
    sink = make_sink(tls_cert=cert, tls_key=key, implicit_tls=True)
    result = drive(sink, tls="implicit-verify", trust_root=str(ca_pem), messages=[message(["bob@remote.test"])])
    assert result["open"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert sink.messages()[0]["tls"] is True and "STARTTLS" not in verbs(sink)


def test_implicit_tls_wrong_host_name_fails(make_sink, ca) -> None:
    ca_pem, cert, key = ca
    sink = make_sink(tls_cert=cert, tls_key=key, implicit_tls=True)
    result = drive(sink, host="mx2.remote.test", tls="implicit-verify", trust_root=str(ca_pem))
    assert "TLS handshake" in result["open"]["error"]["reason"]
    assert sink.lines() == []


def test_plaintext_injected_after_starttls_is_ignored(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key, inject_after_starttls="250 injected\r\n")
    result = drive(sink, tls="opportunistic", messages=[message(["bob@remote.test"]), message(["carol@remote.test"])])
    # Had "250 injected" been taken as the reply to the EHLO after TLS, the
    # extensions would be empty and every later reply one step out of line.
    assert "PIPELINING" in result["open"]["extensions"]
    assert [codes(send) for send in result["sends"]] == [{"bob@remote.test": 250}, {"carol@remote.test": 250}]
    assert len(sink.messages()) == 2


# --- AUTH --------------------------------------------------------------------


def test_auth_plain_over_tls(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key, auth="relayuser:pa55word")
    result = drive(sink, tls="opportunistic", auth=["relayuser", "pa55word"], messages=[message(["bob@remote.test"])])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert sink.messages()[0]["auth"] == "relayuser"
    assert any(entry["line"].startswith("AUTH PLAIN ") and entry["tls"] for entry in sink.commands())


def test_auth_login_when_plain_is_not_offered(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key, auth="relayuser:pa55word", auth_mechanisms="LOGIN")
    result = drive(sink, tls="opportunistic", auth=["relayuser", "pa55word"], messages=[message(["bob@remote.test"])])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    assert sink.messages()[0]["auth"] == "relayuser"
    assert "AUTH LOGIN" in sink.lines()


def test_auth_bad_password_fails_permanently(make_sink, self_signed) -> None:
    cert, key = self_signed
    sink = make_sink(tls_cert=cert, tls_key=key, auth="relayuser:pa55word")
    result = drive(sink, tls="opportunistic", auth=["relayuser", "wrong"], messages=[message(["bob@remote.test"])])
    error = result["open"]["error"]
    assert error["reply"]["code"] == 535 and error["reply"]["status"] == "5.7.8"
    assert error["permanent"] is True
    assert "MAIL" not in verbs(sink)


def test_auth_never_sent_in_plaintext(make_sink) -> None:
    sink = make_sink(auth="relayuser:pa55word")
    result = drive(sink, tls="opportunistic", auth=["relayuser", "pa55word"], messages=[message(["bob@remote.test"])])
    assert "without TLS" in result["open"]["error"]["reason"]
    assert "AUTH" not in verbs(sink) and "MAIL" not in verbs(sink)
    assert not any("cGE1NXdvcmQ" in line or "pa55word" in line for line in sink.lines())


def test_auth_in_plaintext_when_tls_is_none(make_sink) -> None:
    sink = make_sink(auth="relayuser:pa55word")
    result = drive(sink, tls="none", auth=["relayuser", "pa55word"], messages=[message(["bob@remote.test"])])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250} and sink.messages()[0]["auth"] == "relayuser"


# --- the body on the wire ----------------------------------------------------


def _dot_at(parts: list[bytes], offset: int) -> None:
    """Pad with lines of x so that a line starting with "." begins at exactly `offset`."""
    size = sum(map(len, parts))
    gap = offset - size
    assert gap >= 2
    while gap > 900:
        parts.append(b"x" * 898 + b"\r\n")
        gap -= 900
    parts.append(b"y" * (gap - 2) + b"\r\n")
    parts.append(b".at offset\r\n")


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_dots_arrive_byte_exact(make_sink, self_signed, tls: str) -> None:
    parts = [b".first line starts with a dot\r\n", b"Subject: dots\r\n", b"\r\n", b".\r\n", b"..two\r\n",
             b".\r\nMAIL FROM:<smuggled@evil.test>\r\n"]
    for offset in (16384, 65536, 262144, 524288):  # 16 KiB chunks (twisted.mail), 256 KiB writes (ours)
        _dot_at(parts, offset)
    parts.append(b"last\r\n.")  # a final line of just a dot, without a line ending
    stored = b"".join(parts)
    assert all(stored[offset : offset + 1] == b"." for offset in (16384, 65536, 262144, 524288))
    sink = make_sink(tls_cert=self_signed[0], tls_key=self_signed[1])
    result = drive(sink, tls=tls, messages=[message(["bob@remote.test"], stored)])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    [received] = sink.messages()
    assert received["tls"] == (tls != "none")
    assert received["data"].encode("latin-1") == stored + b"\r\n"
    assert not any("smuggled" in line for line in sink.lines())


def test_bare_cr_and_lf_go_out_as_crlf(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, messages=[message(["bob@remote.test"], b"Subject: ends\n\none\rtwo\nthree\r\nfour\r\r\nfive")])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    data = sink.messages()[0]["data"]
    assert data.count("\r\n") == data.count("\n") == data.count("\r")
    assert data == "Subject: ends\r\n\r\none\r\ntwo\r\nthree\r\nfour\r\n\r\nfive\r\n"


def test_size_and_body_parameters(make_sink) -> None:
    sink = make_sink()
    body = b"Subject: size\n\n.stuffed\n\xc3\xa9t\xc3\xa9\n"
    result = drive(sink, messages=[message(["bob@remote.test"], body, body_8bit=True)])
    assert codes(result["sends"][0]) == {"bob@remote.test": 250}
    received = sink.messages()[0]
    size = len(received["data"].encode("latin-1"))
    assert received["mail_params"] == f"SIZE={size} BODY=8BITMIME"


def test_message_over_the_servers_size_is_not_sent(make_sink) -> None:
    sink = make_sink(size=100)
    result = drive(sink, messages=[message(["bob@remote.test"], b"Subject: big\n\n" + b"x" * 200 + b"\n")])
    reply = result["sends"][0]["replies"]["bob@remote.test"]
    assert reply["code"] == 552 and reply["status"] == "5.3.4"
    assert "MAIL" not in verbs(sink)


def test_smtputf8_needed_but_not_offered(make_sink) -> None:
    sink = make_sink(no_smtputf8=True)
    result = drive(sink, messages=[message(["bjørn@remote.test"], "Subject: x\n\nx\n", smtputf8=True)])
    reply = result["sends"][0]["replies"]["bjørn@remote.test"]
    assert reply["code"] == 553 and reply["status"] == "5.6.7" and reply["permanent"]
    assert "MAIL" not in verbs(sink) and result["usable"] == [True]


def test_smtputf8_offered(make_sink) -> None:
    sink = make_sink()
    result = drive(sink, messages=[message(["bjørn@remote.test"], "Subject: x\n\nx\n", sender="åsa@example.test", smtputf8=True)])
    assert codes(result["sends"][0]) == {"bjørn@remote.test": 250}
    received = sink.messages()[0]
    assert received["rcpt_to"] == ["bjørn@remote.test"] and received["mail_from"] == "åsa@example.test"
    assert received["mail_params"].endswith("SMTPUTF8")


# --- session failures --------------------------------------------------------


def test_connection_refused() -> None:
    port = free_port()
    result = drive(None, port=port, connect_timeout=5)
    assert result["open"]["error"]["reason"] == f"connect to {MX}[{ADDRESS}]:{port}: Connection refused"
    assert result["open"]["error"]["permanent"] is False


def test_greeting_421_is_transient(make_sink) -> None:
    sink = make_sink(script=[{"when": "CONNECT", "reply": "421 4.7.0 go away"}])
    error = drive(sink)["open"]["error"]
    assert error["reply"]["str"] == "421 4.7.0 go away" and error["permanent"] is False
    assert "go away" in error["reason"]


def test_greeting_554_is_permanent_and_quits(make_sink) -> None:
    sink = make_sink(script=[{"when": "CONNECT", "reply": "554 5.7.1 no service for you"}])
    error = drive(sink)["open"]["error"]
    assert error["reply"]["code"] == 554 and error["permanent"] is True
    assert verbs(sink) == ["QUIT"]


def test_every_nth_connection_rule(make_sink) -> None:
    sink = make_sink(script=[{"when": "CONNECT", "reply": "421 4.7.0 busy", "every": 2}])
    outcomes = [drive(sink, messages=[message(["bob@remote.test"])])["open"]["ok"] for _ in range(2)]
    assert outcomes == [True, False]
    assert len(sink.messages()) == 1


# --- the reply parser, in-process --------------------------------------------


def test_parse_extensions() -> None:
    reply = Reply(250, "", "mx.test hello\nPIPELINING\nsize 1000\nAUTH=LOGIN PLAIN\n8BITMIME")
    assert parse_extensions(reply) == {"PIPELINING": "", "SIZE": "1000", "AUTH": "LOGIN PLAIN", "8BITMIME": ""}


@pytest.mark.parametrize("message, size", [
    (b"", 0), (b"a\n", 3), (b".\n..\n", 7), (b"a\r\nb", 6), (b"x\r.y\n", 7),
])
def test_message_size_is_rfc1870(message: bytes, size: int) -> None:
    assert message_size(stuff_from_lf(message)) == size


def _protocol() -> tuple[SMTPClientProtocol, StringTransport, Clock]:
    clock = Clock()
    protocol = SMTPClientProtocol(clock, "mx[127.0.0.1]:25", greeting_timeout=300)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_multiline_replies_split_across_buffers() -> None:
    protocol, transport, _ = _protocol()
    greetings: list[Reply] = []
    protocol.greeting.addCallback(greetings.append)
    for piece in (b"220-mx.test ESMTP\r\n220-", b"second\r", b"\n220 third\r\n"):
        protocol.dataReceived(piece)
    assert greetings == [Reply(220, "", "mx.test ESMTP\nsecond\nthird")]
    replies: list[Reply] = []
    protocol.commands(["MAIL FROM:<a@b>", "RCPT TO:<c@d>"], ["MAIL", "RCPT"], 300).addCallback(replies.extend)
    assert transport.value() == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    protocol.dataReceived(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n")
    assert [str(r) for r in replies] == ["250 2.1.0 ok", "550 5.1.1 no"]


@pytest.mark.parametrize("reply", [
    Reply(250, "2.1.0", "Ok"),
    Reply(354, "", "End data with <CR><LF>.<CR><LF>"),
    Reply(452, "4.5.3", "too many\nrecipients"),
    Reply(250, "", "mx.test hello\nPIPELINING\n8BITMIME"),
    Reply(250, "", "\n".join(f"line {n}" for n in range(100))),  # as many lines as a reply may have
])
def test_what_the_server_encodes_the_client_reads_back(reply: Reply) -> None:
    protocol, _, _ = _protocol()
    protocol.dataReceived(b"220 mx.test ESMTP\r\n")
    wire = reply.encode()
    for split in (len(wire), 1, 5, len(wire) - 1):  # whole, and cut at a few places
        replies: list[Reply] = []
        protocol.command("NOOP", "NOOP", 300).addCallback(replies.append)
        protocol.dataReceived(wire[:split])
        protocol.dataReceived(wire[split:])
        assert replies == [reply]
    assert protocol.error is None


def test_a_pipelined_group_gets_all_its_replies_or_the_session_error_once() -> None:
    protocol, _, _ = _protocol()
    protocol.dataReceived(b"220 mx.test ESMTP\r\n")
    answered: list[list[Reply]] = []
    protocol.commands(["MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"], ["MAIL", "RCPT", "DATA"], 300).addCallback(answered.append)
    protocol.dataReceived(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    assert answered == []  # not before the last reply
    protocol.dataReceived(b"354 go ahead\r\n")
    assert [[r.code for r in replies] for replies in answered] == [[250, 250, 354]]

    failures: list[Failure] = []
    protocol.commands(["MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"], ["MAIL", "RCPT", "DATA"], 300).addErrback(failures.append)
    protocol.dataReceived(b"250 2.1.0 ok\r\n")
    protocol.fail(SessionError("connection lost"))
    assert [f.value.reason for f in failures] == ["connection lost"]


@pytest.mark.parametrize("data, reason", [
    (b"220 " + b"x" * 5000 + b"\r\n", "longer than 4096"),
    (b"220 " + b"x" * 5000, "longer than 4096"),
    (b"".join(b"220-line\r\n" for _ in range(101)), "more than 100 lines"),
    (b"hello\r\n", "malformed"),
    (b"220-a\r\n250 b\r\n", "reply code changed within a reply (220, then 250)"),
    (b"220 hi\r\n250 extra\r\n", "nobody asked for"),
])
def test_protocol_violations_fail_the_session(data: bytes, reason: str) -> None:
    protocol, transport, _ = _protocol()
    protocol.greeting.addErrback(lambda failure: None)
    protocol.dataReceived(data)
    assert protocol.error is not None and reason in protocol.error.reason
    assert transport.disconnected  # aborted: nothing more is read or written


@pytest.mark.parametrize("first, then", [(600, 300), (300, 600), (300, 300)])
def test_the_timer_rearmed_keeps_the_newest_deadline(first: float, then: float) -> None:
    """arm() moves its one timer sooner or later: the session fails at the newest deadline only."""
    protocol, _, clock = _protocol()
    protocol.greeting.addErrback(lambda failure: None)
    protocol.arm(first, "first")
    clock.advance(10)
    protocol.arm(then, "then")
    clock.advance(then - 1)
    assert protocol.error is None
    clock.advance(2)
    assert protocol.error is not None and f"timeout after {then}s" in protocol.error.reason
    assert "(then)" in protocol.error.reason
    assert not [call for call in clock.getDelayedCalls() if call.active()]  # the first deadline is gone


def test_greeting_timeout() -> None:
    protocol, _, clock = _protocol()
    failures: list[Any] = []
    protocol.greeting.addErrback(failures.append)
    clock.advance(299)
    assert not failures
    clock.advance(2)
    assert failures and failures[0].check(SessionError)
    assert "timeout after 300s" in failures[0].value.reason
