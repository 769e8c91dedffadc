"""The shared SMTP codec (mailhost.smtp.wire), table-driven.

Every table row is one input and the outcome a peer on the wire would see:
a parsed value, or the reply code and enhanced status code of the refusal.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from mailhost.smtp.wire import (
    END_OF_DATA,
    NULL_ADDRESS,
    Address,
    MessageReader,
    Reply,
    SMTPError,
    check_body,
    parse_parameters,
    parse_reply,
    parse_path,
    split_command,
    stuff_from_lf,
    unstuff_to_lf,
)

# --- Reply: encode, parse_reply ------------------------------------------------


@pytest.mark.parametrize(
    "reply, wire",
    [
        (Reply(250, "2.0.0", "Ok"), b"250 2.0.0 Ok\r\n"),
        (Reply(550, "5.1.1", "no such user"), b"550 5.1.1 no such user\r\n"),
        (Reply(220, "", "mail.example.test ESMTP"), b"220 mail.example.test ESMTP\r\n"),
        (
            Reply(250, "", "mail.example.test\nPIPELINING\nSIZE 1000"),
            b"250-mail.example.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
        ),
        (
            Reply(451, "4.3.0", "first\nsecond"),
            b"451-4.3.0 first\r\n451 4.3.0 second\r\n",
        ),
        (Reply(354, "", "End data with <CR><LF>.<CR><LF>"), b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ],
)
def test_reply_encode(reply: Reply, wire: bytes) -> None:
    assert reply.encode() == wire


@pytest.mark.parametrize(
    "lines, reply",
    [
        ([b"250 2.1.0 Ok"], Reply(250, "2.1.0", "Ok")),
        ([b"451 4.7.1 try again later"], Reply(451, "4.7.1", "try again later")),
        ([b"250 Ok"], Reply(250, "", "Ok")),
        ([b"354 End data with <CR><LF>.<CR><LF>"], Reply(354, "", "End data with <CR><LF>.<CR><LF>")),
        ([b"554 5.7.1"], Reply(554, "5.7.1", "")),  # a status and no text
        ([b"354 "], Reply(354, "", "")),
        ([b"250"], Reply(250, "", "")),  # no text, no space
        ([b"250 2.0.0  two spaces"], Reply(250, "2.0.0", " two spaces")),  # one space belongs to the status
        ([b"250 2.999.999 big"], Reply(250, "2.999.999", "big")),
        # RFC 3463 2: a status whose class is not the code's is text; the code is trusted
        ([b"550 4.1.1 class does not match the code"], Reply(550, "", "4.1.1 class does not match the code")),
        ([b"354 3.0.0 go ahead"], Reply(354, "", "3.0.0 go ahead")),  # there is no class 3
        ([b"250 2.1.0Ok"], Reply(250, "", "2.1.0Ok")),  # not followed by a space: not a status
        ([b"250 2.1 Ok"], Reply(250, "", "2.1 Ok")),
        ([b"250 2.1000.0 Ok"], Reply(250, "", "2.1000.0 Ok")),
        ([b"250 caf\xc3\xa9 \xff"], Reply(250, "", "caf\u00e9 \ufffd")),  # UTF-8; other bytes replaced
        # multi-line: the status comes off every line that repeats it (RFC 2034 3)
        ([b"452-4.5.3 too many", b"452 4.5.3 recipients"], Reply(452, "4.5.3", "too many\nrecipients")),
        ([b"452-4.5.3 too many", b"452 recipients"], Reply(452, "4.5.3", "too many\nrecipients")),
        ([b"550-5.1.1 a", b"550-5.1.1", b"550 5.1.2 b"], Reply(550, "5.1.1", "a\n\n5.1.2 b")),
        ([b"220-mx.test ESMTP", b"220-second", b"220 third"], Reply(220, "", "mx.test ESMTP\nsecond\nthird")),
        ([b"250-mx.test hello", b"250-PIPELINING", b"250 8BITMIME"], Reply(250, "", "mx.test hello\nPIPELINING\n8BITMIME")),
    ],
)
def test_parse_reply(lines: list[bytes], reply: Reply) -> None:
    assert parse_reply(lines) == reply


@pytest.mark.parametrize(
    "lines, error",
    [
        ([b"hello"], "malformed reply line b'hello'"),
        ([b"25"], "malformed"),
        ([b""], "malformed"),
        ([b"2500 Ok"], "malformed"),
        ([b"150 Ok"], "malformed"),  # no such class
        ([b"650 Ok"], "malformed"),
        ([b"250-Ok"], "malformed"),  # a continuation that nothing follows
        ([b"250\tOk"], "malformed"),
        ([b"250 a", b"250 b"], "malformed reply line b'250 a'"),  # two replies, not one
        ([b"250-a", b"250-b"], "malformed reply line b'250-b'"),
        ([b"220-a", b"250 b"], "reply code changed within a reply (220, then 250)"),
        ([b"220-a", b"xyz b"], "malformed reply line b'xyz b'"),
        ([b"abc-a", b"250 b"], "malformed reply line b'abc-a'"),
        ([b"220-a", b"22"], "malformed"),
    ],
)
def test_parse_reply_refuses_what_is_not_one_reply(lines: list[bytes], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_reply(lines)


@pytest.mark.parametrize(
    "reply, effective_status, text",
    [
        (Reply(451, "4.7.1", "try again later"), "4.7.1", "451 4.7.1 try again later"),
        (Reply(250, "", "Ok"), "2.0.0", "250 Ok"),
        (Reply(550, "", "4.1.1 class does not match the code"), "5.0.0", "550 4.1.1 class does not match the code"),
        (Reply(452, "4.5.3", "too many\nrecipients"), "4.5.3", "452 4.5.3 too many / recipients"),
        (Reply(354, "", ""), "3.0.0", "354"),
        (Reply(554, "5.7.1", ""), "5.7.1", "554 5.7.1"),
    ],
)
def test_reply_effective_status_and_str(reply: Reply, effective_status: str, text: str) -> None:
    assert (reply.effective_status, str(reply)) == (effective_status, text)
    assert reply.permanent == (reply.code >= 500) and reply.transient == (400 <= reply.code < 500)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(250, "2.0.0", "Ok"),
        Reply(250, "", "Ok"),
        Reply(220, "", "mail.example.test ESMTP mailhost"),
        Reply(550, "5.1.1", "alice@example.test: no such user"),
        Reply(354, "", "End data with <CR><LF>.<CR><LF>"),
        Reply(554, "5.7.1", ""),
        Reply(421, "", ""),
        Reply(250, "", "mail.example.test\nPIPELINING\nSIZE 1000\n8BITMIME"),
        Reply(451, "4.3.0", "first\nsecond"),
        Reply(451, "4.3.0", "first\n\nthird after an empty line\n"),
        Reply(250, "", "caf\u00e9\nd\u00e9j\u00e0 vu"),
        Reply(452, "4.5.3", " leading space\n"),
    ],
)
def test_reply_round_trip(reply: Reply) -> None:
    """What the server encodes, the client's parser gives back unchanged."""
    lines = reply.encode().split(b"\r\n")
    assert lines.pop() == b""
    assert parse_reply(lines) == reply


def test_parse_reply_stays_right_past_its_cache() -> None:
    """Lines seen lately are answered from a bounded cache: the same answers, however many distinct lines come."""
    for n in range(600):
        assert parse_reply([b"250 2.1.0 Ok"]) == Reply(250, "2.1.0", "Ok")
        assert parse_reply([b"250 2.0.0 queued as %d" % n]) == Reply(250, "2.0.0", f"queued as {n}")
    long = b"x" * 300
    assert parse_reply([b"550 5.7.1 " + long]) == parse_reply([b"550 5.7.1 " + long]) == Reply(550, "5.7.1", "x" * 300)


def test_parse_reply_never_raises_but_value_error() -> None:
    """Random reply-shaped lines (seeded, so a failure repeats): a Reply, or ValueError, nothing else;
    and every Reply it gives encodes to lines that parse to it again."""
    rng = random.Random(3463)
    pieces = [b"2", b"4", b"5", b"3", b"1", b"0", b"9", b".", b" ", b"-", b"\t", b"Ok", b"\xff", b"\xc3\xa9", b"\x00"]
    for _ in range(3000):
        lines = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12))) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.7:  # mostly well-formed codes, so the status and text paths run too
            code = rng.choice([b"220", b"250", b"354", b"421", b"451", b"550"])
            lines = [code + (b"-" if i < len(lines) - 1 else b" ") + line for i, line in enumerate(lines)]
        try:
            reply = parse_reply(lines)
        except ValueError:
            continue
        assert isinstance(reply, Reply)
        again = reply.encode().split(b"\r\n")[:-1]
        assert parse_reply(again) == reply, lines


# --- split_command -------------------------------------------------------------


@pytest.mark.parametrize(
    "line, allow_utf8, expected",
    [
        (b"MAIL FROM:<a@example.test>", False, ("MAIL", "FROM:<a@example.test>")),
        (b"mail from:<a@example.test> SIZE=10", False, ("MAIL", "from:<a@example.test> SIZE=10")),
        (b"ehlo client.example.test", False, ("EHLO", "client.example.test")),
        (b"EHLO  client.example.test  ", False, ("EHLO", "client.example.test")),
        (b"NOOP", False, ("NOOP", "")),
        (b"quit", False, ("QUIT", "")),
        (b"DATA ", False, ("DATA", "")),
        (b"", False, ("", "")),
        (b"HELP\tme", False, ("HELP\tME", "")),  # a tab is not a control character to refuse
        ("RCPT TO:<jösé@example.test>".encode(), True, ("RCPT", "TO:<jösé@example.test>")),
    ],
)
def test_split_command(line: bytes, allow_utf8: bool, expected: tuple[str, str]) -> None:
    assert split_command(line, allow_utf8) == expected


@pytest.mark.parametrize(
    "line, allow_utf8",
    [
        (b"NOOP\x00", False),
        (b"MAIL FROM:<a\x00b@example.test>", True),
        (b"NO\x01OP", False),
        (b"EHLO x\x1b[31m", False),
        (b"EHLO x\x7f", True),
        (b"EHLO x\rRSET", False),  # a bare CR inside a command line
        (b"EHLO x\nRSET", False),  # a bare LF inside a command line
        (b"EHLO x\x0c", False),
        (b"EHLO x\x1f", False),
        ("EHLO jösé".encode(), False),  # 8-bit without SMTPUTF8
        (b"EHLO \xff\xfe", False),
        (b"EHLO \xff\xfe", True),  # not UTF-8 at all
        (b"RCPT TO:<\xc3@example.test>", True),  # truncated UTF-8 sequence
        (b"RCPT TO:<\xed\xa0\x80@example.test>", True),  # an encoded surrogate
    ],
)
def test_split_command_refuses_controls_and_8bit(line: bytes, allow_utf8: bool) -> None:
    with pytest.raises(SMTPError) as caught:
        split_command(line, allow_utf8)
    assert (caught.value.reply.code, caught.value.reply.status) == (500, "5.5.2")


# --- parse_path: valid paths ---------------------------------------------------


def _domain_of(length: int) -> str:
    """A syntactically valid domain of exactly `length` octets (labels of up to 63)."""
    labels = []
    remaining = length
    while remaining > 0:
        size = min(63, remaining)
        if remaining - size == 1:  # never leave room for just the dot
            size -= 1
        labels.append("d" * size)
        remaining -= size + 1
    domain = ".".join(labels)
    assert len(domain) == length
    return domain


@pytest.mark.parametrize(
    "text, utf8, local, domain, rest",
    [
        ("<alice@example.test>", False, "alice", "example.test", ""),
        ("<Alice@Example.TEST>", False, "Alice", "Example.TEST", ""),
        ("<first.last@example.test>", False, "first.last", "example.test", ""),
        ("<a.b.c.d@sub.example.test>", False, "a.b.c.d", "sub.example.test", ""),
        ("<a!#$%&'*+-/=?^_`{|}~z@example.test>", False, "a!#$%&'*+-/=?^_`{|}~z", "example.test", ""),
        ("<alice+news@example.test>", False, "alice+news", "example.test", ""),
        ("<x@a>", False, "x", "a", ""),
        ("<x@0-9.example-1.test>", False, "x", "0-9.example-1.test", ""),
        # quoted local parts, with quoted-pairs
        ('<"john doe"@example.test>', False, '"john doe"', "example.test", ""),
        ('<"a\\"b"@example.test>', False, '"a\\"b"', "example.test", ""),
        ('<"a\\\\b"@example.test>', False, '"a\\\\b"', "example.test", ""),
        ('<"a@b"@example.test>', False, '"a@b"', "example.test", ""),
        ('<"..a.."@example.test>', False, '"..a.."', "example.test", ""),
        ('<"\\ "@example.test>', False, '"\\ "', "example.test", ""),
        # address literals: IPv4, IPv6, general
        ("<user@[192.0.2.1]>", False, "user", "[192.0.2.1]", ""),
        ("<user@[255.255.255.255]>", False, "user", "[255.255.255.255]", ""),
        ("<user@[IPv6:2001:db8::1]>", False, "user", "[IPv6:2001:db8::1]", ""),
        ("<user@[IPv6:::1]>", False, "user", "[IPv6:::1]", ""),
        ("<user@[IPv6:2001:db8::192.0.2.1]>", False, "user", "[IPv6:2001:db8::192.0.2.1]", ""),
        ("<user@[x-tag:some-content]>", False, "user", "[x-tag:some-content]", ""),
        # source routes are accepted and dropped (RFC 5321 3.6.1, 4.1.2)
        ("<@relay.test:alice@example.test>", False, "alice", "example.test", ""),
        ("<@relay.test,@hop2.test:alice@example.test>", False, "alice", "example.test", ""),
        ("<@relay.test,@hop2.test:alice@example.test> SIZE=10", False, "alice", "example.test", "SIZE=10"),
        # parameters are handed back as the rest
        ("<alice@example.test> SIZE=1000 BODY=8BITMIME", False, "alice", "example.test", "SIZE=1000 BODY=8BITMIME"),
        ("<alice@example.test>  SMTPUTF8 ", True, "alice", "example.test", "SMTPUTF8"),
        # relay tricks are syntactically valid local parts (policy refuses to route them)
        ("<u%remote.test@example.test>", False, "u%remote.test", "example.test", ""),
        ("<remote.test!u@example.test>", False, "remote.test!u", "example.test", ""),
        ('<"u@remote.test"@example.test>', False, '"u@remote.test"', "example.test", ""),
        # SMTPUTF8 (RFC 6531): non-ASCII local parts and domains, accepted with utf8
        ("<jösé@example.test>", True, "jösé", "example.test", ""),
        ("<用户@例子.测试>", True, "用户", "例子.测试", ""),
        ("<user@bücher.example>", True, "user", "bücher.example", ""),
        ('<"jö sé"@example.test>', True, '"jö sé"', "example.test", ""),
        # the length limits, exactly at the boundary
        (f"<{'l' * 64}@example.test>", False, "l" * 64, "example.test", ""),
        (f"<{'l' * 64}@{_domain_of(189)}>", False, "l" * 64, _domain_of(189), ""),  # path of 256 octets
        (f"<l@{_domain_of(252)}>", False, "l", _domain_of(252), ""),  # path of 256 octets
    ],
)
def test_parse_path_valid(text: str, utf8: bool, local: str, domain: str, rest: str) -> None:
    address, remainder = parse_path(text, utf8=utf8, null_ok=False, kind="recipient")
    assert address == Address(local, domain)
    assert remainder == rest


@pytest.mark.parametrize(
    "local, bare",
    [
        ("alice", "alice"),
        ('"john doe"', "john doe"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"u@remote.test"', "u@remote.test"),
        ('"alice"', "alice"),
    ],
)
def test_address_bare_local(local: str, bare: str) -> None:
    assert Address(local, "example.test").bare_local == bare


def test_address_str_and_flags() -> None:
    assert str(Address("alice", "example.test")) == "alice@example.test"
    assert str(NULL_ADDRESS) == ""
    assert NULL_ADDRESS.is_null and not Address("a", "b").is_null


@pytest.mark.parametrize(
    "text, rest",
    [("<>", ""), ("<> SIZE=100", "SIZE=100"), ("<> BODY=8BITMIME SMTPUTF8", "BODY=8BITMIME SMTPUTF8")],
)
def test_null_sender_where_allowed(text: str, rest: str) -> None:
    address, remainder = parse_path(text, utf8=False, null_ok=True, kind="sender")
    assert address == NULL_ADDRESS and address.is_null
    assert remainder == rest


@pytest.mark.parametrize("text", ["<>", "<> SIZE=100"])
def test_null_path_refused_where_not_allowed(text: str) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_path(text, utf8=False, null_ok=False, kind="recipient")
    assert (caught.value.reply.code, caught.value.reply.status) == (501, "5.1.3")


# --- parse_path: invalid paths -------------------------------------------------

INVALID_PATHS = [
    "alice@example.test",  # no angle brackets
    "<alice@example.test",
    "alice@example.test>",
    "<<alice@example.test>>",
    "<alice>",  # no domain (only RCPT TO:<Postmaster> may, handled by the server)
    "<@example.test>",
    "<alice@>",
    "<alice@@example.test>",
    "<>>",
    "< alice@example.test>",
    "<alice@example.test >",
    "<alice @example.test>",
    "<a b@example.test>",
    "<a..b@example.test>",
    "<.alice@example.test>",
    "<alice.@example.test>",
    "<a(comment)@example.test>",
    "<a,b@example.test>",
    "<a;b@example.test>",
    "<a[b@example.test>",
    "<a\\b@example.test>",
    '<"unterminated@example.test>',
    '<"a"b@example.test>',
    '<a"b"@example.test>',
    '<"a\\"@example.test>',  # the escape eats the closing quote
    '<"a"."b"@example.test>',
    "<u@remote.test@example.test>",  # two @: never an address
    "<alice@-example.test>",
    "<alice@example-.test>",
    "<alice@example..test>",
    "<alice@.example.test>",
    "<alice@example.test.>",
    "<alice@exa_mple.test>",
    "<alice@exa mple.test>",
    "<alice@example.test>garbage",
    "<alice@example.test>,<bob@example.test>",
    "<alice@example.test>\tSIZE=1",
    # address literals
    "<alice@[]>",
    "<alice@[300.1.1.1]>",
    "<alice@[1.2.3]>",
    "<alice@[1.2.3.4.5]>",
    "<alice@[192.0.2.1>",
    "<alice@192.0.2.1]>",
    "<alice@[foo]>",
    "<alice@[IPv6:zz::1]>",
    "<alice@[IPv6:1:2:3:4:5:6:7:8:9]>",
    "<alice@[IPv6:192.0.2.1]>",
    "<alice@[:content]>",
    "<alice@[tag-:content]>",
    "<alice@[tag:con[tent]>",
    "<alice@[192.0.2.1]x>",
    # malformed source routes
    "<@relay.test,alice@example.test>",
    "<@relay.test:@hop.test:alice@example.test>",
    "<@:alice@example.test>",
    "<@relay.test,:alice@example.test>",
    "<relay.test:alice@example.test>",
    # length limits: local part 64, domain 255, path 256 octets
    f"<{'l' * 65}@example.test>",
    f"<{'l' * 64}@{_domain_of(190)}>",  # 257-octet path
    f"<l@{_domain_of(253)}>",  # 257-octet path
    f"<l@{_domain_of(255)}>",
    f"<l@{_domain_of(256)}>",
    f'<"{"q" * 63}"@example.test>',  # quotes count: 65 octets as written
]


@pytest.mark.parametrize("text", INVALID_PATHS)
@pytest.mark.parametrize("kind, status", [("sender", "5.1.7"), ("recipient", "5.1.3")])
def test_parse_path_invalid(text: str, kind: str, status: str) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_path(text, utf8=True, null_ok=True, kind=kind)
    assert (caught.value.reply.code, caught.value.reply.status) == (501, status)


@pytest.mark.parametrize(
    "text",
    [
        f"<{'é' * 33}@example.test>",  # 33 characters, 66 octets: the limit is in octets
        f"<{'l' * 63}é@example.test>",
    ],
)
def test_parse_path_limits_count_octets_not_characters(text: str) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_path(text, utf8=True, null_ok=False, kind="recipient")
    assert (caught.value.reply.code, caught.value.reply.status) == (501, "5.1.3")


@pytest.mark.parametrize(
    "text",
    [
        "<jösé@example.test>",
        "<user@bücher.example>",
        '<"jö sé"@example.test>',
        "<用户@例子.测试>",
        "<@relay.test:jösé@example.test>",
        "<jösé@example.test> SIZE=10",
    ],
)
@pytest.mark.parametrize("kind", ["sender", "recipient"])
def test_parse_path_non_ascii_needs_smtputf8(text: str, kind: str) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_path(text, utf8=False, null_ok=True, kind=kind)
    assert (caught.value.reply.code, caught.value.reply.status) == (553, "5.6.7")
    # ... and the same path is accepted once SMTPUTF8 was given
    address, _ = parse_path(text, utf8=True, null_ok=True, kind=kind)
    assert not str(address).isascii()



def test_importing_wire_leaves_the_smtputf8_path_pattern_for_its_first_use() -> None:
    """Its classes reach U+10FFFF, which takes re 0.1-0.2 s to compile: every daemon and worker
    paid that at start. A fresh interpreter imports the module and counts such patterns."""
    script = (
        "import re, sys\n"
        "wide = []\n"
        "compile = re.compile\n"
        "def counting(pattern, flags=0):\n"
        "    if isinstance(pattern, str) and '\\\\U0010ffff' in pattern:\n"
        "        wide.append(pattern)\n"
        "    return compile(pattern, flags)\n"
        "re.compile = counting\n"
        "from mailhost.smtp import wire\n"
        "before = len(wide)\n"
        "wire.parse_path('<j\\u00f6s\\u00e9@example.test>', utf8=True, null_ok=False, kind='recipient')\n"
        "print(before, len(wide))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, result.stdout.split())
    assert after == before + 1  # compiled at the first non-ASCII path, not at import


# --- parse_parameters ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("   ", {}),
        ("SIZE=1000", {"SIZE": "1000"}),
        ("size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("SIZE=10  SMTPUTF8", {"SIZE": "10", "SMTPUTF8": None}),
        ("X-FOO-BAR=a:b;c", {"X-FOO-BAR": "a:b;c"}),
        ("ENVID=QQ314159", {"ENVID": "QQ314159"}),
        ("ORCPT=rfc822;alice+2Bx@example.test", {"ORCPT": "rfc822;alice+2Bx@example.test"}),
        ("NOTIFY=SUCCESS,FAILURE", {"NOTIFY": "SUCCESS,FAILURE"}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("9X=1", {"9X": "1"}),
        ("X-NAME=jösé", {"X-NAME": "jösé"}),  # RFC 6531 allows UTF-8 in esmtp-value
    ],
)
def test_parse_parameters(text: str, expected: dict) -> None:
    assert parse_parameters(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "=1000",
        "SIZE=",
        "SIZE==1",
        "SIZE=a=b",
        "-SIZE=1",
        "X_Y=1",
        "SI.ZE=1",
        "SIZE=1\x00",
        "SIZE=\x7f",
        "SIZE=1 SIZE=2",
        "size=1 SIZE=2",
        "SMTPUTF8 smtputf8",
        "<alice@example.test>",
    ],
)
def test_parse_parameters_invalid(text: str) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_parameters(text)
    assert (caught.value.reply.code, caught.value.reply.status) == (501, "5.5.4")


# --- MessageReader -------------------------------------------------------------

AFTER = b"QUIT\r\n"  # what the client pipelined behind the data


def read_in_two(data: bytes, split: int, limit: int = 1 << 20) -> tuple[MessageReader, bytes]:
    """Feed `data` as two network buffers split at `split`; return the reader and
    the bytes it did not claim (those go back to the command parser)."""
    reader = MessageReader(limit)
    rest = b""
    for chunk in (data[:split], data[split:]):
        if reader.body is not None:
            rest += chunk
            continue
        used = reader.feed(chunk)
        assert 0 <= used <= len(chunk)
        if reader.body is not None:
            rest += chunk[used:]
        else:
            assert used == len(chunk)
    return reader, rest


def read_in_pieces(data: bytes, size: int, limit: int = 1 << 20) -> tuple[MessageReader, bytes]:
    reader = MessageReader(limit)
    rest = b""
    for start in range(0, len(data), size):
        chunk = data[start : start + size]
        if reader.body is not None:
            rest += chunk
            continue
        used = reader.feed(chunk)
        if reader.body is not None:
            rest += chunk[used:]
    return reader, rest


# (what the client sends between DATA's 354 and the terminator, included; the message as stored)
MESSAGES = [
    (b".\r\n", b""),  # "." as the very first line: an empty message
    (b"\r\n.\r\n", b"\n"),  # one empty line
    (b"a\r\n.\r\n", b"a\n"),
    (b"Subject: hi\r\n\r\nbody\r\n.\r\n", b"Subject: hi\n\nbody\n"),
    (b"..\r\n.\r\n", b".\n"),  # a stuffed dot as the first line
    (b"...\r\n.\r\n", b"..\n"),
    (b"..x\r\n.\r\n", b".x\n"),
    (b".x\r\n.\r\n", b"x\n"),  # an unstuffed leading dot is dropped (RFC 5321 4.5.2)
    (b"a\r\n..\r\nb\r\n.\r\n", b"a\n.\nb\n"),
    (b"a\r\n.. \r\n.\r\n", b"a\n. \n"),
    (b"a.\r\n.a\r\n.\r\n", b"a.\na\n"),
    (b"a\r\n\r\n\r\n.\r\n", b"a\n\n\n"),
]


@pytest.mark.parametrize("wire, stored", MESSAGES)
def test_message_reader_every_split(wire: bytes, stored: bytes) -> None:
    data = wire + AFTER
    for split in range(len(data) + 1):
        reader, rest = read_in_two(data, split)
        assert reader.body is not None, split
        assert rest == AFTER, split
        assert not reader.oversized
        assert reader.size == len(wire) - 3, split  # the octets before ".\r\n"
        assert check_body(reader.body) is None
        assert unstuff_to_lf(reader.body) == stored, split


@pytest.mark.parametrize("wire, stored", MESSAGES)
def test_message_reader_byte_by_byte(wire: bytes, stored: bytes) -> None:
    reader, rest = read_in_pieces(wire + AFTER, 1)
    assert reader.body is not None and rest == AFTER
    assert unstuff_to_lf(reader.body) == stored


def test_message_reader_waits_for_the_terminator() -> None:
    reader = MessageReader(1 << 20)
    for chunk in (b"a\r\n", b".", b"\r", b"\r\n", b".\r"):
        assert reader.feed(chunk) == len(chunk)
        assert reader.body is None
    assert reader.feed(b"\nNOOP\r\n") == 1
    assert reader.body == b"\r\na\r\n.\r\r\n"


SMUGGLING_SHAPES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n. \r\n",
    b"\r\n.\x00\r\n",
    b"\n\n.\n\n",
    b"\r\r.\r\r",
    b"\r\n\n.\r\n",
    b"\r\n\r.\r\n",
]


@pytest.mark.parametrize("shape", SMUGGLING_SHAPES, ids=repr)
def test_smuggling_shapes_never_end_the_data(shape: bytes) -> None:
    smuggled = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nspoof\r\n"
    wire = b"Subject: x\r\n\r\nline" + shape + smuggled + b".\r\n"
    data = wire + AFTER
    for split in range(len(data) + 1):
        reader, rest = read_in_two(data, split)
        assert reader.body is not None, split
        assert rest == AFTER, split
        assert shape in reader.body and smuggled in reader.body, split
    # the message did not end early; a bare CR or LF in it is refused as a whole
    verdict = check_body(reader.body)
    if shape.count(b"\r") != shape.count(b"\r\n") or shape.count(b"\n") != shape.count(b"\r\n"):
        assert verdict is not None and (verdict.code, verdict.status) == (550, "5.6.11")


@pytest.mark.parametrize("shape", [b"\n.\n", b"\r.\r\n", b"\r\n.\n", b"\n.\r\n"], ids=repr)
def test_smuggling_shape_as_the_first_line_does_not_end_the_data(shape: bytes) -> None:
    # The reader's implicit CRLF before the first line must not pair with a bare CR/LF.
    wire = shape + b"MAIL FROM:<evil@attacker.test>\r\n.\r\n"
    data = wire + AFTER
    for split in range(len(data) + 1):
        reader, rest = read_in_two(data, split)
        assert rest == AFTER, split
        assert b"MAIL FROM:<evil@attacker.test>" in reader.body


def _oversized_message(size: int) -> bytes:
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line) + 1)
    return body + b".\r\n"


@pytest.mark.parametrize("limit", [1024, 4096])
def test_oversized_message_is_read_to_its_end_every_split(limit: int) -> None:
    wire = _oversized_message(3 * limit)
    data = wire + AFTER
    for split in range(0, len(data) + 1, 7):
        reader, rest = read_in_two(data, split, limit=limit)
        assert reader.body is not None, split
        assert reader.oversized, split
        assert rest == AFTER, split
        assert reader.size == len(wire) - 3, split
    for split in range(len(data) - 12, len(data) + 1):  # every split around the terminator
        reader, rest = read_in_two(data, split, limit=limit)
        assert reader.oversized and rest == AFTER, split


@pytest.mark.parametrize("piece", [1, 2, 3, 4, 5, 6, 7, 1000, 1024, 16384])
def test_oversized_message_in_small_pieces(piece: int) -> None:
    limit = 1024
    wire = _oversized_message(8 * limit)
    reader, rest = read_in_pieces(wire + AFTER, piece, limit=limit)
    assert reader.body is not None and reader.oversized
    assert rest == AFTER
    assert reader.size == len(wire) - 3


@pytest.mark.parametrize("shape", SMUGGLING_SHAPES, ids=repr)
def test_oversized_message_smuggling_shapes_do_not_end_it(shape: bytes) -> None:
    limit = 1024
    wire = b"x" * 2000 + shape + b"MAIL FROM:<evil@attacker.test>\r\n" + b"y" * 100 + b"\r\n.\r\n"
    for piece in (1, 3, 5, 64):
        reader, rest = read_in_pieces(wire + AFTER, piece, limit=limit)
        assert reader.oversized and rest == AFTER, piece
        assert reader.size == len(wire) - 3


@pytest.mark.parametrize("piece", [1, 7, 1000, 16384])
def test_reader_overflows_past_its_cap(piece: int) -> None:
    limit, cap = 1024, 2048
    reader = MessageReader(limit, cap=cap)
    data = _oversized_message(4 * limit)[:-3]  # no end in sight
    fed = 0
    while not reader.overflowed:
        reader.feed(data[fed : fed + piece])
        fed += piece
        assert fed <= cap + piece + 4
    assert reader.body is None and reader.size > cap


def test_reader_under_its_cap_reads_to_the_end() -> None:
    reader, rest = read_in_pieces(_oversized_message(1900), 100, limit=1024)
    assert reader.oversized and not reader.overflowed and rest == b""
    capped = MessageReader(1024, cap=2048)
    assert capped.feed(_oversized_message(1900) + AFTER) == len(_oversized_message(1900))
    assert capped.oversized and not capped.overflowed


@pytest.mark.parametrize("extra, oversized", [(-1, False), (0, False), (1, True)])
def test_oversized_boundary(extra: int, oversized: bool) -> None:
    limit = 1024
    content = b"z" * (limit + extra - 2) + b"\r\n"
    reader, rest = read_in_pieces(content + b".\r\n" + AFTER, 100, limit=limit)
    assert reader.size == limit + extra
    assert reader.oversized is oversized
    assert rest == AFTER


# --- check_body ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body, verdict",
    [
        (b"\r\n", None),
        (b"\r\nSubject: x\r\n\r\nhello\r\n", None),
        (b"\r\n" + b"x" * 998 + b"\r\n", None),  # 1000 octets with CRLF: the limit
        (b"\r\n8bit \xc3\xa9 \xff\r\n", None),  # 8-bit data is not refused here
        (b"\r\ntab\there\r\n", None),
        (b"\r\n" + b"x" * 999 + b"\r\n", (500, "5.5.6")),
        (b"\r\nshort\r\n" + b"x" * 5000 + b"\r\n", (500, "5.5.6")),
        (b"\r\na\nb\r\n", (550, "5.6.11")),  # bare LF
        (b"\r\na\rb\r\n", (550, "5.6.11")),  # bare CR
        (b"\r\na\n\rb\r\n", (550, "5.6.11")),  # LF CR is not a line ending
        (b"\r\na\r\r\nb\r\n", (550, "5.6.11")),
        (b"\r\na\r\n\nb\r\n", (550, "5.6.11")),
        (b"\r\nline\n.\nMAIL FROM:<x@y>\r\n", (550, "5.6.11")),
        (b"\r\na\x00b\r\n", (550, "5.6.0")),
    ],
)
def test_check_body(body: bytes, verdict: tuple[int, str] | None) -> None:
    reply = check_body(body)
    if verdict is None:
        assert reply is None
    else:
        assert reply is not None and (reply.code, reply.status) == verdict


# --- unstuff_to_lf / stuff_from_lf ---------------------------------------------


@pytest.mark.parametrize(
    "body, stored",
    [
        (b"\r\n", b""),
        (b"\r\nabc\r\n", b"abc\n"),
        (b"\r\n..x\r\n", b".x\n"),
        (b"\r\n...\r\n", b"..\n"),
        (b"\r\na\r\n..\r\nb\r\n", b"a\n.\nb\n"),
        (b"\r\na.b\r\n", b"a.b\n"),
        (b"\r\n\r\n\r\n", b"\n\n"),
        (b"\r\nx\r\n..\r\n...\r\n", b"x\n.\n..\n"),
    ],
)
def test_unstuff_to_lf(body: bytes, stored: bytes) -> None:
    assert unstuff_to_lf(body) == stored


@pytest.mark.parametrize(
    "message, wire",
    [
        (b"", b".\r\n"),
        (b"a\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),  # missing final newline
        (b".a\n", b"..a\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\n", b"a\r\nb\r\n.\r\n"),  # bare CR
        (b"a\nb\r\nc\rd", b"a\r\nb\r\nc\r\nd\r\n.\r\n"),
        (b"a\n\n", b"a\r\n\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"a.b\n", b"a.b\r\n.\r\n"),
    ],
)
def test_stuff_from_lf(message: bytes, wire: bytes) -> None:
    assert stuff_from_lf(message) == wire


def _lines_to(offset: int) -> bytes:
    """LF lines filling exactly `offset` bytes, so that the next line starts there."""
    short, full = offset % 64, offset // 64
    out = (b"y" * (short - 1) + b"\n" if short else b"") + (b"y" * 63 + b"\n") * full
    assert len(out) == offset
    return out


ROUND_TRIP = [
    b"Subject: plain\n\nhello\n",
    b".leading dot\n",
    b".\n",
    b"..\n",
    b"...\n",
    b"a\n.\nb\n",
    b"a\n.\n.\n.\n",
    b".\n.\n",
    b"\n.\n",
    b"x\n. \n.x\n",
    _lines_to(16384) + b".\nMAIL FROM:<evil@attacker.test>\n",  # a dot at offset 16384 (LF form)
    _lines_to(16383) + b".\nMAIL FROM:<evil@attacker.test>\n",
    _lines_to(16385) + b".\nMAIL FROM:<evil@attacker.test>\n",
    _lines_to(16384 - 256) + b".\n" * 200,  # dots straddling 16384 in every form
    b"a\r\nb\r\n.\r\nc\r\n",  # already CRLF
    b"bare\rcr\r.\rafter\n",  # bare CR line endings
    b"mixed\nlf\r\ncrlf\rcr\n",
    b"no final newline",
    b"ends with a dot line\n.",
    b".",
    b"",
    b"\r",
    b"\r\n",
]


def _normalised(message: bytes) -> bytes:
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text if not text or text.endswith(b"\n") else text + b"\n"


@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: repr(m[:20]) + f"..{len(m)}")
def test_stuff_round_trip(message: bytes) -> None:
    wire = stuff_from_lf(message)
    # every line ending is CRLF, and the terminator is there exactly once, at the end
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")
    assert (b"\r\n" + wire).find(END_OF_DATA) == len(wire) - 3
    expected = _normalised(message)
    for piece in (len(wire) + 1, 16384, 4096, 1000, 7):
        reader, rest = read_in_pieces(wire + AFTER, piece)
        assert rest == AFTER, piece
        assert check_body(reader.body) is None
        assert unstuff_to_lf(reader.body) == expected, piece


def test_stuffed_dot_at_chunk_boundary_every_split() -> None:
    message = _lines_to(16384) + b".\nMAIL FROM:<evil@attacker.test>\n"
    wire = stuff_from_lf(message) + AFTER
    for split in range(16370, 16400):
        reader, rest = read_in_two(wire, split)
        assert rest == AFTER, split
        assert unstuff_to_lf(reader.body) == message, split
