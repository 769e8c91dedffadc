"""Fuzzing the shared SMTP codec (mailhost.smtp.wire) with Hypothesis.

test_wire.py holds the tables; here every function that reads a peer's bytes
gets arbitrary input and must answer with a value or its documented error
(SMTPError, with a reply code and enhanced status code, or ValueError from
parse_reply), never anything else; what can round-trip does; and the DATA
reader gives the same answer however the network splits its input.

The budget (examples, no deadline, derandomized under CI) is the "mailhost"
profile in tests/conftest.py.
"""

from __future__ import annotations

import re

from hypothesis import assume, example, given
from hypothesis import strategies as st

from mailhost.smtp.wire import (
    END_OF_DATA,
    LOCAL_PART_MAX,
    PATH_MAX,
    TEXT_LINE_MAX,
    Address,
    MessageReader,
    Reply,
    SMTPError,
    check_body,
    parse_bdat,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_parameters,
    parse_path,
    parse_reply,
    parse_ret,
    split_command,
    stuff_from_lf,
    unstuff_to_lf,
    xtext_decode,
    xtext_encode,
)


def joined(pieces: list[bytes] | list[str]) -> st.SearchStrategy:
    """Sequences of protocol-shaped pieces and arbitrary bits, joined: random bytes
    alone almost never hold a CRLF.CRLF or a well-formed path."""
    if isinstance(pieces[0], bytes):
        piece = st.one_of(st.sampled_from(pieces), st.binary(max_size=6))
        return st.lists(piece, max_size=24).map(b"".join)
    piece = st.one_of(st.sampled_from(pieces), st.text(max_size=4))
    return st.lists(piece, max_size=24).map("".join)


# Bytes as they come in DATA: line endings of every kind, dots, the terminator
# and its near misses, NUL, 8-bit.
DATA_PIECES = [
    b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.\r\n", b"\r\n.", b".\r\n", b"\n.\n", b"\r.\r",
    b"a", b"Subject: x", b" ", b"\x00", b"\xff", b"\xc3\xa9", b"x" * 300,
]
data_bytes = joined(DATA_PIECES)

# Command lines: verbs, spaces, paths, controls, 8-bit.
COMMAND_PIECES = [
    b"MAIL FROM:", b"rcpt to:", b"EHLO", b" ", b"  ", b"<a@example.test>", b"\t", b"\x00", b"\x7f",
    b"\r", b"\n", b"\xc3\xa9", b"\xff", b"SIZE=10", b"=",
]

# Paths and parameters: the grammar's punctuation, literals, quoting, non-ASCII.
PATH_PIECES = [
    "<", ">", "<>", "@", ".", "a", "b-c", '"', "\\", "[", "]", "IPv6:", "::1", "127.0.0.1", ",", ":",
    " ", "é", "例え", "0", "x" * 70, "-", "+tag", "SIZE=1", "BODY=8BITMIME", "=",
]
path_text = joined(PATH_PIECES)

SYNTAX_REFUSALS = {(500, "5.5.2")}
PATH_REFUSALS = {(501, "5.1.7"), (501, "5.1.3"), (553, "5.6.7")}


def reply_of(error: SMTPError) -> tuple[int, str]:
    return error.reply.code, error.reply.status


# --- split_command ---------------------------------------------------------------


@given(line=st.one_of(st.binary(max_size=80), joined(COMMAND_PIECES)), allow_utf8=st.booleans())
def test_split_command_answers_a_verb_or_500(line: bytes, allow_utf8: bool) -> None:
    try:
        verb, argument = split_command(line, allow_utf8)
    except SMTPError as error:
        assert reply_of(error) in SYNTAX_REFUSALS
        return
    assert " " not in verb and verb == verb.upper()
    assert argument == argument.strip(" ")
    # What it gives is what the line said, the verb's case aside.
    text = line.decode("utf-8" if allow_utf8 else "ascii")
    assert text.upper().startswith(verb)
    assert argument in text


# --- parse_path -------------------------------------------------------------------


@given(text=st.one_of(st.text(max_size=80), path_text), utf8=st.booleans(), null_ok=st.booleans(),
       kind=st.sampled_from(["sender", "recipient"]))
@example(text="<a@[IPv6:::1::2]>", utf8=False, null_ok=False, kind="recipient")
@example(text="<a@[999.1.1.1]>", utf8=False, null_ok=False, kind="sender")
@example(text='<"\\é"@example.test>', utf8=False, null_ok=False, kind="sender")
def test_parse_path_answers_an_address_or_its_refusal(text: str, utf8: bool, null_ok: bool, kind: str) -> None:
    try:
        address, rest = parse_path(text, utf8=utf8, null_ok=null_ok, kind=kind)
    except SMTPError as error:
        code, status = reply_of(error)
        assert (code, status) in PATH_REFUSALS
        if code == 501:  # 5.1.7 for a sender, 5.1.3 for a recipient (RFC 3463 3.2)
            assert status == ("5.1.7" if kind == "sender" else "5.1.3")
        return
    assert rest == rest.strip(" ")
    if address.is_null:
        assert null_ok
        return
    assert address.local and address.domain
    assert len(address.local.encode()) <= LOCAL_PART_MAX
    assert len(str(address).encode()) + 2 <= PATH_MAX
    # The address it read, written back as a path, reads the same (a source route is dropped).
    again, rest_again = parse_path(f"<{address}>", utf8=utf8, null_ok=False, kind=kind)
    assert (again, rest_again) == (address, "")


ALNUM = "abcxyzABCXYZ0189"
ATEXT = ALNUM + "!#$%&'*+-/=?^_`{|}~"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=10)
let_dig = st.sampled_from(ALNUM)
# RFC 5321 sub-domain: Let-dig [Ldh-str]
label = st.one_of(let_dig, st.tuples(let_dig, st.text(alphabet=ALNUM + "-", max_size=8), let_dig).map("".join))


@given(local=st.lists(atom, min_size=1, max_size=4).map(".".join),
       domain=st.lists(label, min_size=1, max_size=4).map(".".join),
       params=st.sampled_from(["", " SIZE=100", "  BODY=8BITMIME SMTPUTF8"]))
def test_parse_path_reads_every_dot_atom_address(local: str, domain: str, params: str) -> None:
    """Every RFC 5321 Dot-string@Domain within the limits is read as written."""
    address, rest = parse_path(f"<{local}@{domain}>{params}", utf8=False, null_ok=False, kind="recipient")
    assert address == Address(local, domain)
    assert rest == params.strip(" ")


# --- parse_parameters -------------------------------------------------------------


@given(text=st.one_of(st.text(max_size=60), path_text))
def test_parse_parameters_answers_a_dict_or_501(text: str) -> None:
    try:
        params = parse_parameters(text)
    except SMTPError as error:
        assert reply_of(error) == (501, "5.5.4")
        return
    for key, value in params.items():
        assert key == key.upper() and key and "=" not in key
        assert value is None or (value and " " not in value and "=" not in value)


# esmtp-keyword (RFC 5321 4.1.2): (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
keyword = st.tuples(let_dig, st.text(alphabet=ALNUM + "-", max_size=10)).map("".join)
# esmtp-value (RFC 5321 4.1.2; RFC 6531 3.3 adds UTF-8): printable, no "=", no space.
value = st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                              exclude_characters="="), min_size=1, max_size=12))


@given(params=st.dictionaries(keyword.map(str.upper), value, max_size=5), gaps=st.lists(st.sampled_from([" ", "  "]),
                                                                                           min_size=6, max_size=6))
def test_parse_parameters_round_trip(params: dict[str, str | None], gaps: list[str]) -> None:
    words = [key if value is None else f"{key}={value}" for key, value in params.items()]
    text = "".join(gap + word for gap, word in zip(gaps, words))
    assert parse_parameters(text) == params
    assert parse_parameters(text.lower()) == {key: value.lower() if value else value for key, value in params.items()}


# --- parse_reply and Reply.encode -------------------------------------------------

REPLY_PIECES = [b"250", b"220", b"354", b"451", b"550", b"-", b" ", b"2.1.0", b"5.7.1", b"4.0.0", b"Ok",
                b"\t", b"\xff", b"\xc3\xa9", b"\x00", b"\r", b"\n", b"9", b"."]
reply_line = st.one_of(st.binary(max_size=20), joined(REPLY_PIECES))


@given(lines=st.lists(reply_line, min_size=1, max_size=4))
@example(lines=[b"250-2.0.0 x", b"250 2.0.0"])
@example(lines=[b"250 2.0.0\tOk"])
def test_parse_reply_answers_a_reply_or_value_error(lines: list[bytes]) -> None:
    try:
        reply = parse_reply(lines)
    except ValueError:
        return
    assert 200 <= reply.code <= 599
    assert reply.status == "" or reply.status[0] == str(reply.code)[0]
    # What a client parsed, encoded again (as a proxy or a DSN would quote it), parses the same.
    assert parse_reply(reply.encode().split(b"\r\n")[:-1]) == reply


# A status that could be read off the start of a text line (the one case
# Reply.encode -> parse_reply cannot tell apart, as its docstring says).
_STATUS_LIKE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(\s|$)")


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 599))
    klass = code // 100
    status = ""
    if klass != 3 and draw(st.booleans()):
        status = f"{klass}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}"
    text = "\n".join(draw(st.lists(st.text(max_size=20), min_size=1, max_size=4)))
    return Reply(code, status, text)


@given(reply=replies())
@example(reply=Reply(250, "2.0.0", ""))
@example(reply=Reply(250, "", "first\n2.0.0 second"))
def test_reply_encode_then_parse_is_the_same_reply(reply: Reply) -> None:
    assume(reply.status or not _STATUS_LIKE.match(reply.text))
    lines = reply.encode().split(b"\r\n")
    assert lines.pop() == b""
    assert parse_reply(lines) == reply


# --- DATA: check_body, stuffing, MessageReader ---------------------------------------


@given(body=st.one_of(st.binary(max_size=200), data_bytes))
def test_check_body_verdict(body: bytes) -> None:
    """None exactly for a body of CRLF lines without NUL, each within the line limit
    (and unstuffing whatever came never fails either)."""
    assert isinstance(unstuff_to_lf(body), bytes)
    verdict = check_body(body)
    lines = body.split(b"\r\n")
    clean = (not any(b"\r" in line or b"\n" in line for line in lines) and b"\x00" not in body
             and all(len(line) <= TEXT_LINE_MAX - 2 for line in lines))
    if clean:
        assert verdict is None
    else:
        assert verdict is not None and verdict.code in (500, 550) and verdict.status[0] == "5"


def normalised(message: bytes) -> bytes:
    """A message as a Maildir keeps it: LF lines, the last one ended."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text + b"\n" if text and not text.endswith(b"\n") else text


def read(data: bytes, cuts: list[int], limit: int) -> tuple[MessageReader, bytes]:
    """Feed `data` to a MessageReader as network buffers cut at `cuts`; return the
    reader and what it did not claim (what goes back to the command parser)."""
    reader = MessageReader(limit)
    rest = b""
    bounds = [0, *sorted(cuts), len(data)]
    for start, stop in zip(bounds, bounds[1:]):
        chunk = data[start:stop]
        if reader.body is not None:
            rest += chunk
            continue
        used = reader.feed(chunk)
        assert 0 <= used <= len(chunk)
        if reader.body is None:
            assert used == len(chunk)
        else:
            rest += chunk[used:]
    return reader, rest


def cuts_of(data: bytes) -> st.SearchStrategy[list[int]]:
    """Where to cut `data` into buffers: anywhere, and often inside or next to a
    CRLF.CRLF (the one place where a cut can matter)."""
    near = sorted({at + k for at in range(-2, len(data)) if (b"\r\n" + data).startswith(END_OF_DATA, at + 2)
                   for k in range(6) if 0 <= at + k <= len(data)})
    anywhere = st.integers(0, len(data))
    return st.lists(st.one_of(anywhere, st.sampled_from(near)) if near else anywhere, max_size=12)


@given(message=st.one_of(st.binary(max_size=200), data_bytes), after=data_bytes, data=st.data())
@example(message=b".", after=b"", data=None)
@example(message=b"a\r\n.\r\nMAIL FROM:<x@example.test>\r\n", after=b"", data=None)
def test_stuffed_message_reads_back_whole_for_every_split(message: bytes, after: bytes, data: st.DataObject | None) -> None:
    """stuff_from_lf (our client) -> MessageReader + unstuff_to_lf (our server) gives the
    message back, and the data ends exactly where the client's terminator is: nothing in a
    message can end it early and run the rest as commands, however the buffers fall."""
    wire = stuff_from_lf(message)
    stream = wire + after
    cuts = data.draw(cuts_of(stream)) if data is not None else []
    reader, rest = read(stream, cuts, 1 << 20)
    assert reader.body is not None
    assert rest == after
    assert not reader.oversized and reader.size == len(wire) - 3
    assert unstuff_to_lf(reader.body) == normalised(message)
    verdict = check_body(reader.body)
    assert verdict is None or verdict.status != "5.6.11"  # stuffing leaves no bare CR or LF


# Small limits so that "oversized" happens often. Not 0: config.py keeps
# limits.message_size >= 1024, and at 0 the reader's first trim of a 1-byte
# buffer miscounts the size (a 1-byte message then reads as 0 or 2 octets).
@given(stream=data_bytes, limit=st.one_of(st.integers(1, 64), st.just(1 << 20)), data=st.data())
@example(stream=b"x" * 70 + b"\r\n.\r\nQUIT\r\n", limit=64, data=None)
@example(stream=b"\r\n.\r\n", limit=1, data=None)
def test_message_reader_same_answer_for_every_split(stream: bytes, limit: int, data: st.DataObject | None) -> None:
    """However the input is cut into buffers: the data ends at the first CRLF.CRLF (a "."
    first line counts), the size, the oversized verdict and the bytes left over are the
    same, and so is the body whenever the server uses it (not oversized: past the limit
    the reader keeps only a few bytes to find the end, and the server answers 552)."""
    cuts = data.draw(cuts_of(stream)) if data is not None else []
    reader, rest = read(stream, cuts, limit)
    whole = b"\r\n" + stream  # the reader's view: a CRLF before the first line
    end = whole.find(END_OF_DATA)
    if end < 0:
        assert reader.body is None and rest == b""
        assert reader.size == len(stream)
    else:
        assert reader.body is not None
        assert reader.size == end
        assert rest == whole[end + len(END_OF_DATA):]
        if not reader.oversized:
            assert reader.body == whole[: end + 2]
    assert reader.oversized == (reader.size > limit)



# --- RFC 3461 parameters and RFC 3030 chunk sizes -------------------------------------


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_xtext_round_trips_any_ascii(text: str) -> None:
    encoded = xtext_encode(text)
    assert all("!" <= ch <= "~" and ch != "=" for ch in encoded)
    assert xtext_decode(encoded) == text


@given(joined(["NEVER", "SUCCESS", "FAILURE", "DELAY", ",", "rfc822;", "+2B", "+", "=", "LAST", " ", "0", "9"]))
def test_dsn_and_bdat_parsers_answer_or_refuse_with_501(text: str) -> None:
    for parse in (parse_notify, parse_orcpt, parse_ret, parse_envid):
        try:
            parse(text)
        except SMTPError as e:
            assert (e.reply.code, e.reply.status) == (501, "5.5.4")
    try:
        size, last = parse_bdat(text)
    except ValueError:
        return
    assert size >= 0 and isinstance(last, bool)
