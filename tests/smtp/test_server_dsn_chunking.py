"""The DSN extension (RFC 3461) and CHUNKING / BDAT (RFC 3030) on the server side, in-process:
the sessions of tests/smtp/test_server_auth.py (a StringTransport, a fake clock, the real
intake with a recording store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer

from mailhost.smtp.wire import (ENVID_MAX, chunked_to_lf, crlf_from_lf, format_orcpt, parse_bdat, parse_envid,
                                parse_notify, parse_orcpt, xtext_decode, xtext_encode)
from tests.smtp.test_server_auth import Session, World

RELAY_CLIENT = "127.0.0.1"  # in relay.networks: may send to remote addresses


def mx(world: World, source: str = "192.0.2.1") -> Session:
    session = world.session("mx", source=source)
    assert session.send("EHLO client.test").startswith("250")
    return session


def feed(session: Session, data: bytes) -> str:
    session.protocol.dataReceived(data)
    return session.read()


def stored(world: World) -> list[tuple]:
    return world.intake.accepted


# --- the codec ---------------------------------------------------------------------


@pytest.mark.parametrize("text, decoded", [
    ("plain", "plain"), ("a+2Bb", "a+b"), ("x+3Dy", "x=y"), ("+20sp", " sp"), ("", ""),
])
def test_xtext_round_trips(text: str, decoded: str) -> None:
    assert xtext_decode(text) == decoded
    assert xtext_decode(xtext_encode(decoded)) == decoded


@pytest.mark.parametrize("bad", ["a+", "a+4", "a+GG", "a=b", "a b", "caf\u00e9"])
def test_bad_xtext_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


def test_dsn_parameter_values() -> None:
    assert parse_notify("never") == ("NEVER",)
    assert parse_notify("delay,SUCCESS") == ("SUCCESS", "DELAY")  # in RFC order
    assert parse_orcpt("rfc822;bob+2Bx@remote.test") == "rfc822;bob+x@remote.test"
    assert format_orcpt("rfc822;bob+x@remote.test") == "rfc822;bob+2Bx@remote.test"
    assert parse_envid("QQ+2B1") == "QQ+1"
    assert parse_bdat("100") == (100, False) and parse_bdat("0 last") == (0, True)


@pytest.mark.parametrize("argument", ["", "x", "-1", "1 LAST extra", "1 FIRST", "1e3", "\u0661\u0662", "9" * 19])
def test_bad_bdat_arguments(argument: str) -> None:
    with pytest.raises(ValueError):
        parse_bdat(argument)


def test_chunked_bodies_keep_their_dots() -> None:
    assert chunked_to_lf(b"\r\n.\r\n..x\r\n") == b".\n..x\n"
    assert crlf_from_lf(b".\n..x") == b".\r\n..x\r\n"


# --- DSN parameters at MAIL and RCPT -----------------------------------------------


def test_ehlo_offers_dsn_and_chunking(tmp_path: Path) -> None:
    world = World(tmp_path)
    reply = world.session("mx").send("EHLO client.test")
    assert "250-DSN" in reply and "250-CHUNKING" in reply


def test_dsn_parameters_reach_the_queued_envelope(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world, RELAY_CLIENT)
    assert session.send("MAIL FROM:<alice@example.test> RET=HDRS ENVID=QQ+2B314").startswith("250 2.1.0")
    assert session.send("RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+2Bx@remote.test") \
        .startswith("250")
    assert session.send("RCPT TO:<carol@remote.test>").startswith("250")
    assert session.send("DATA").startswith("354")
    assert session.send("Subject: hi\r\n\r\nhello\r\n.").startswith("250 2.0.0")
    [(_, envelope, _, _)] = stored(world)
    assert (envelope.ret, envelope.envid) == ("HDRS", "QQ+314")
    assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
        ("bob@remote.test", ["SUCCESS", "DELAY"], "rfc822;Bob+x@remote.test"), ("carol@remote.test", None, None)]


def test_an_alias_passes_notify_on_and_names_itself_the_original_recipient(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.config.domain("example.test").aliases["away"] = ["dave@remote.test"]
    session = mx(world, RELAY_CLIENT)
    session.send("MAIL FROM:<alice@example.test>")
    assert session.send("RCPT TO:<away@example.test> NOTIFY=FAILURE").startswith("250")
    session.send("DATA")
    assert session.send("Subject: hi\r\n\r\nhello\r\n.").startswith("250 2.0.0")
    [(_, envelope, _, _)] = stored(world)
    [recipient] = envelope.recipients
    assert (recipient.address, recipient.notify, recipient.orcpt) == (
        "dave@remote.test", ["FAILURE"], "rfc822;away@example.test")


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<a@remote.test> RET=ALL", "501 5.5.4"),
    ("MAIL FROM:<a@remote.test> RET", "501 5.5.4"),
    ("MAIL FROM:<a@remote.test> ENVID=+G1", "501 5.5.4"),
    ("MAIL FROM:<a@remote.test> ENVID=" + "x" * (ENVID_MAX + 1), "501 5.5.4"),
    ("MAIL FROM:<a@remote.test> ENVID=a+0Ab", "501 5.5.4"),  # a decoded line break
    ("MAIL FROM:<a@remote.test> RET=FULL RET=HDRS", "501 5.5.4"),
])
def test_bad_mail_dsn_parameters(tmp_path: Path, command: str, reply: str) -> None:
    session = mx(World(tmp_path))
    assert session.send(command).startswith(reply)
    assert session.send("MAIL FROM:<a@remote.test>").startswith("250")  # no transaction was started


@pytest.mark.parametrize("parameters, reply", [
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ("NOTIFY=BOGUS", "501 5.5.4"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
    ("NOTIFY", "501 5.5.4"),
    ("ORCPT=alice@example.test", "501 5.5.4"),  # no addr-type
    ("ORCPT=rfc822;a+ZZ@example.test", "501 5.5.4"),
    ("ORCPT=;alice@example.test", "501 5.5.4"),
    ("NOTIFY=FAILURE NOTIFY=DELAY", "501 5.5.4"),
    ("XFOO=1", "555 5.5.4"),
])
def test_bad_rcpt_dsn_parameters(tmp_path: Path, parameters: str, reply: str) -> None:
    session = mx(World(tmp_path))
    session.send("MAIL FROM:<a@remote.test>")
    assert session.send(f"RCPT TO:<alice@example.test> {parameters}").startswith(reply)
    assert session.send("RCPT TO:<alice@example.test> NOTIFY=never").startswith("250")


def test_notify_success_on_local_delivery_sends_a_delivered_report(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    session.send("MAIL FROM:<sender@remote.test> ENVID=env-42")
    assert session.send("RCPT TO:<alice@example.test> NOTIFY=SUCCESS ORCPT=rfc822;alice@example.test") \
        .startswith("250")
    assert session.send("RCPT TO:<bob@example.test>").startswith("250")  # no NOTIFY: no success report
    session.send("DATA")
    assert session.send("Subject: hi\r\n\r\nhello\r\n.").startswith("250 2.0.0")
    [(copies, _, _, _), (_, report_envelope, _, report)] = stored(world)
    assert len(copies) == 2
    assert report_envelope.sender == "" and [r.address for r in report_envelope.recipients] == ["sender@remote.test"]
    text = report.decode()
    assert "Original-Envelope-Id: env-42" in text
    assert "Original-Recipient: rfc822; alice@example.test" in text
    assert "Final-Recipient: rfc822; alice@example.test" in text and "bob@example.test" not in text
    assert "Action: delivered" in text and "Status: 2.0.0" in text
    assert "Subject: Successful Mail Delivery Report" in text


def test_no_delivered_report_for_the_null_sender(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    session.send("MAIL FROM:<>")
    session.send("RCPT TO:<alice@example.test> NOTIFY=SUCCESS")
    session.send("DATA")
    assert session.send("Subject: hi\r\n\r\nhello\r\n.").startswith("250 2.0.0")
    assert len(stored(world)) == 1  # the message only


# --- BDAT ----------------------------------------------------------------------------


def transaction(session: Session, rcpt: str = "alice@example.test") -> None:
    assert session.send("MAIL FROM:<sender@remote.test>").startswith("250")
    assert session.send(f"RCPT TO:<{rcpt}>").startswith("250")


def test_pipelined_chunks_make_one_message(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    first, second = b"Subject: hi\r\n\r\n.line one\r\n", b"..two\r\n.\r\nQUIT\r\n"
    replies = feed(session, b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                   + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second + b"NOOP\r\n")
    lines = replies.splitlines()
    assert lines[0].startswith("250 2.1.0") and lines[1].startswith("250")
    assert lines[2] == f"250 2.0.0 Ok: {len(first)} octets received"
    assert lines[3].startswith("250 2.0.0 Ok: queued as ")
    assert lines[4].startswith("250 2.0.0 Ok")  # the NOOP: "QUIT" in the chunk was message text
    assert not session.closed
    [(copies, _, _, body)] = stored(world)
    assert body.endswith(b"Subject: hi\n\n.line one\n..two\n.\nQUIT\n")  # no dot-unstuffing in BDAT


def test_bdat_0_last_ends_the_message(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 16\r\nSubject: x\r\n\r\nhi").startswith("250 2.0.0 Ok: 16 octets")
    assert feed(session, b"BDAT 0 LAST\r\n").startswith("250 2.0.0 Ok: queued")
    [(_, _, _, body)] = stored(world)
    assert body.endswith(b"Subject: x\n\nhi\n")  # the last line is ended


def test_chunks_split_across_network_reads(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    transaction(session)
    data = b"BDAT 20 LAST\r\nSubject: s\r\n\r\nabcdef\r\n"
    replies = "".join(feed(session, data[i:i + 3]) for i in range(0, len(data), 3))
    assert replies.startswith("250 2.0.0 Ok: queued")


def test_bdat_before_mail_is_refused_and_its_chunk_skipped(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    assert feed(session, b"BDAT 6\r\nQUIT\r\n").startswith("503 5.5.1")
    assert not session.closed
    assert session.send("NOOP").startswith("250")


def test_data_after_bdat_is_refused(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 3\r\nabc").startswith("250 2.0.0 Ok: 3 octets")
    assert session.send("DATA").startswith("503 5.5.1")
    assert session.send("RSET").startswith("250")  # RSET ends the transaction and drops the chunks
    transaction(session)
    assert feed(session, b"BDAT 14 LAST\r\nSubject: a\r\n\r\n").startswith("250 2.0.0 Ok: queued")
    [(_, _, _, body)] = stored(world)
    assert b"abc" not in body


@pytest.mark.parametrize("body, status", [
    (b"Subject: a\r\n\r\nbare\nLF\r\n", "550 5.6.11"),
    (b"Subject: a\r\n\r\nbare\rCR\r\n", "550 5.6.11"),
    (b"Subject: a\r\n\r\nends in CR\r", "550 5.6.11"),
    (b"Subject: a\r\n\r\nNUL\x00\r\n", "550 5.6.0"),
    (b"Subject: a\r\n\r\n" + b"x" * 1000 + b"\r\n", "500 5.5.6"),
])
def test_bdat_messages_meet_the_data_rules(tmp_path: Path, body: bytes, status: str) -> None:
    world = World(tmp_path)
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT %d LAST\r\n" % len(body) + body).startswith(status)
    assert stored(world) == []
    assert session.send("MAIL FROM:<sender@remote.test>").startswith("250")  # the transaction is over


def test_over_the_size_limit_is_552_and_nothing_is_stored(tmp_path: Path) -> None:
    world = World(tmp_path, limits="message_size = 2000")
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 1200\r\n" + b"a" * 1200).startswith("250 2.0.0 Ok: 1200")
    assert feed(session, b"BDAT 1200\r\n" + b"b" * 1200).startswith("552 5.3.4")
    assert feed(session, b"BDAT 10 LAST\r\n" + b"c" * 10).startswith("552 5.3.4")  # the same answer
    assert stored(world) == []
    assert session.send("NOOP").startswith("250")
    transaction(session)  # a new transaction works
    assert feed(session, b"BDAT 14 LAST\r\nSubject: a\r\n\r\n").startswith("250 2.0.0 Ok: queued")


def test_a_giant_chunk_is_refused_at_once_and_the_session_closed(tmp_path: Path) -> None:
    world = World(tmp_path, limits="message_size = 2000")
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 99999999999 LAST\r\nshort").startswith("552 5.3.4")
    assert session.closed and stored(world) == []


def test_a_chunk_that_never_comes_is_cut_by_the_data_timeout(tmp_path: Path) -> None:
    world = World(tmp_path, limits="message_size = 100000\ndata_timeout = 30")
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 90000 LAST\r\nshort body") == ""
    world.clock.advance(29)
    assert not session.closed
    world.clock.advance(1)
    assert session.read().startswith("421 4.4.2") and session.closed
    assert stored(world) == []


def test_a_bdat_without_a_size_closes_the_session(tmp_path: Path) -> None:
    session = mx(World(tmp_path))
    transaction(session)
    assert feed(session, b"BDAT lots\r\nMAIL FROM:<x@y.test>\r\n").startswith("521 5.5.4")
    assert session.closed


def test_the_250_after_bdat_last_waits_for_the_disk(tmp_path: Path) -> None:
    world = World(tmp_path)
    held: list[defer.Deferred] = []

    def store(copies, envelope, outbound_headers, body, signing_key=None) -> defer.Deferred:
        world.intake.accepted.append((copies, envelope, outbound_headers, body))
        held.append(defer.Deferred())
        return held[-1]

    world.intake.store = store
    session = mx(world)
    transaction(session)
    assert feed(session, b"BDAT 14 LAST\r\nSubject: a\r\n\r\nNOOP\r\n") == ""  # the NOOP waits too
    held[0].callback(None)
    replies = session.read().splitlines()
    assert replies[0].startswith("250 2.0.0 Ok: queued") and replies[1].startswith("250 2.0.0 Ok")


def test_bdat_needs_auth_on_submission_and_its_chunk_is_skipped(tmp_path: Path) -> None:
    world = World(tmp_path)
    session = world.session("submission")
    session.send("EHLO client.test")
    assert feed(session, b"BDAT 6 LAST\r\nQUIT\r\n").startswith("530 5.7.0")
    assert not session.closed
