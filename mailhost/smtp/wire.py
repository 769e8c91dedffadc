"""The SMTP codec both sides share: replies, command lines, RFC 5321 paths,
ESMTP parameters, and the DATA framing (end of data, dot-stuffing, line endings).

Everything here works on whole buffers with C-level bytes methods: no Python
call per line of a message.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

COMMAND_LINE_MAX = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
# SASL responses (RFC 4954 4: "12288 octets is considered to be a sufficient line length
# limit"); also taken for an AUTH command with its initial response, which RFC 4954 wants
# within the 512 but clients with long tokens (XOAUTH2) send all the same.
AUTH_LINE_MAX = 12288  # octets including CRLF
TEXT_LINE_MAX = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)
LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
PATH_MAX = 256

END_OF_DATA = b"\r\n.\r\n"


@dataclass(frozen=True)
class Reply:
    """One SMTP reply, either way: a code, an enhanced status code (RFC 3463;
    "" when there is none) and its text, the lines joined with "\\n".

    The server builds these and sends `encode()`; the client gets them from
    `parse_reply`, so `parse_reply` of `encode()`'s lines gives the same Reply
    back (unless a text line itself starts like a status code).
    """

    code: int
    status: str
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n")
        prefix = f"{self.code}-{self.status} " if self.status else f"{self.code}-"
        out = [prefix + line for line in lines[:-1]]
        out.append(f"{self.code} {self.status} {lines[-1]}" if self.status else f"{self.code} {lines[-1]}")
        return ("\r\n".join(out) + "\r\n").encode("utf-8")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def effective_status(self) -> str:
        """The enhanced status code, else one derived from the reply code ("4.0.0" for a bare 451)."""
        return self.status or f"{self.code // 100}.0.0"

    def __str__(self) -> str:
        """One line for logs and DSNs: "550 5.1.1 no such user", the lines of a multi-line reply joined by " / "."""
        head = f"{self.code} {self.status}" if self.status else str(self.code)
        text = self.text.replace("\n", " / ")
        return f"{head} {text}".rstrip()


# An enhanced status code at the start of a reply's text (RFC 3463 2, RFC 2034 3).
_ENHANCED_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")


def parse_reply(lines: list[bytes]) -> Reply:
    """The Reply that `lines` make: the lines of one reply as read off the wire,
    without their line endings (b"250-first", b"250 last"). ValueError when they
    are not one well-formed reply: a bad code, a code that changes from line to
    line, a continuation mark ("-") on the last line or missing on another.

    The enhanced status code is taken from the start of the first line when its
    class agrees with the reply code (RFC 3463 2; else the code is trusted and
    the text kept whole), and split off every line that repeats it (RFC 2034 3
    puts it on each line). Text is UTF-8, undecodable bytes replaced.
    """
    if len(lines) == 1:
        line = lines[0]
        reply = _seen.get(line)
        if reply is None:
            reply = _one_line(line)
            if len(line) <= _SEEN_LINE_MAX:
                if len(_seen) >= _SEEN_MAX:
                    _seen.clear()
                _seen[line] = reply
        return reply
    code = lines[0][:3]
    if len(code) < 3 or not code.isdigit() or code[0] not in b"2345":
        raise _malformed(lines[0])
    for line in lines[1:]:
        if line[:3] != code:
            if len(line) < 3 or not line[:3].isdigit():
                raise _malformed(line)
            raise ValueError(f"reply code changed within a reply ({int(code)}, then {int(line[:3])})")
    for line in lines[:-1]:
        if line[3:4] != b"-":
            raise _malformed(line)
    if lines[-1][3:4] not in (b" ", b""):
        raise _malformed(lines[-1])
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    match = _ENHANCED_STATUS.match(texts[0]) if texts[0][:1] == chr(code[0]) else None
    if match is None:
        return Reply(int(code), "", "\n".join(texts))
    status = match.group()
    size = len(status)
    return Reply(int(code), status, "\n".join(
        text[size + 1 :] if text[:size] == status and (len(text) == size or text[size].isspace()) else text
        for text in texts
    ))


# Most replies a client reads repeat ("250 2.1.0 Ok" to every MAIL): a line seen
# lately costs one dict lookup. Bounded: emptied when full, short lines only.
_seen: dict[bytes, Reply] = {}
_SEEN_MAX = 256
_SEEN_LINE_MAX = 200  # octets


def _one_line(line: bytes) -> Reply:
    """A one-line reply (see parse_reply)."""
    code = line[:3]
    if len(code) < 3 or not code.isdigit() or code[0] not in b"2345" or line[3:4] not in (b" ", b""):
        raise _malformed(line)
    text = line[4:].decode("utf-8", "replace")
    # The class digit first: a reply without a status mostly skips the regex.
    match = _ENHANCED_STATUS.match(text) if text[:1] == chr(code[0]) else None
    if match is None:
        return Reply(int(code), "", text)
    return Reply(int(code), match.group(), text[match.end() + 1 :])


def _malformed(line: bytes) -> ValueError:
    return ValueError(f"malformed reply line {line[:80]!r}")


class SMTPError(Exception):
    """Raised by the codec when input breaks the protocol; carries the reply."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.reply = Reply(code, status, text)


# --- command lines -----------------------------------------------------------

_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def split_command(line: bytes, allow_utf8: bool) -> tuple[str, str]:
    """Split a command line (without its line ending) into (VERB, argument).

    NUL, control characters, and non-ASCII bytes (unless `allow_utf8`, for
    MAIL/RCPT addresses) are refused with 500 5.5.2.
    """
    if _BAD_COMMAND_BYTES.search(line):
        raise SMTPError(500, "5.5.2", "Syntax error: control character or NUL in command")
    try:
        text = line.decode("utf-8") if allow_utf8 else line.decode("ascii")
    except UnicodeDecodeError:
        raise SMTPError(500, "5.5.2", "Syntax error: 8-bit characters in command") from None
    verb, _, argument = text.partition(" ")
    return verb.upper(), argument.strip(" ")


# --- addresses ---------------------------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = r"\u0080-\U0010ffff"
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e"


def _path_pattern(utf8: bool) -> re.Pattern[str]:
    extra = _UTF8 if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    quoted = rf'"(?:[{_QTEXT}{extra}]|\\[\x20-\x7e])*"'
    label = rf"[A-Za-z0-9{extra}](?:[A-Za-z0-9\-{extra}]*[A-Za-z0-9{extra}])?"
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[[^\[\]\\\s]+\]"
    return re.compile(
        rf"<(?P<adl>@{domain}(?:,@{domain})*:)?"
        rf"(?P<local>{atom}(?:\.{atom})*|{quoted})@(?P<domain>{domain}|{literal})>"
    )


_PATH_ASCII = _path_pattern(False)


@functools.cache
def _path_utf8() -> re.Pattern[str]:
    """The SMTPUTF8 form, compiled when first needed: its classes reach U+10FFFF, which takes re
    0.1-0.2 s, and every process (daemon, worker) paid it at start whether or not it met one."""
    return _path_pattern(True)


_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?$")


@dataclass(frozen=True)
class Address:
    """A mailbox: local part as written (quotes kept) and domain (a literal keeps its brackets)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def bare_local(self) -> str:
        """The local part with quoting undone ("a b" -> a b)."""
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local


NULL_ADDRESS = Address("", "")


def parse_path(text: str, *, utf8: bool, null_ok: bool, kind: str) -> tuple[Address, str]:
    """Parse `<path>` at the start of `text`; return the address and the rest (parameters).

    `kind` is "sender" or "recipient" and picks the enhanced code for bad
    syntax (5.1.7 / 5.1.3). A source route (`@a,@b:`) is accepted and dropped
    (RFC 5321 3.6.1). Non-ASCII without SMTPUTF8 gets 553 5.6.7.
    """
    status = "5.1.7" if kind == "sender" else "5.1.3"
    if null_ok and (text == "<>" or text.startswith("<> ")):
        return NULL_ADDRESS, text[2:].strip(" ")
    match = (_path_utf8() if utf8 or not text.isascii() else _PATH_ASCII).match(text)
    if not match or (match.end() < len(text) and text[match.end()] != " "):
        raise SMTPError(501, status, f"Syntax error in {kind} address (RFC 5321 4.1.2)")
    address = Address(match.group("local"), match.group("domain"))
    if not text[: match.end()].isascii() and not utf8:
        raise SMTPError(553, "5.6.7", f"Non-ASCII {kind} address needs SMTPUTF8 (RFC 6531)")
    if address.domain.startswith("["):
        _check_literal(address.domain, status, kind)
    if len(address.local.encode()) > LOCAL_PART_MAX:
        raise SMTPError(501, status, f"Local part of {kind} address longer than {LOCAL_PART_MAX} octets")
    if len(address.domain.encode()) > DOMAIN_MAX:
        raise SMTPError(501, status, f"Domain of {kind} address longer than {DOMAIN_MAX} octets")
    if len(str(address).encode()) + 2 > PATH_MAX:
        raise SMTPError(501, status, f"Path of {kind} address longer than {PATH_MAX} octets")
    return address, text[match.end() :].strip(" ")


def _check_literal(literal: str, status: str, kind: str) -> None:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        elif re.fullmatch(r"[0-9.]+", inner):
            ipaddress.IPv4Address(inner)
        elif not re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+", inner):
            raise ValueError(inner)
    except ValueError:
        raise SMTPError(501, status, f"Bad address literal in {kind} address") from None


def parse_parameters(text: str) -> dict[str, str | None]:
    """ESMTP parameters `KEY=VALUE KEY2` -> {"KEY": "VALUE", "KEY2": None}; 501 5.5.4 on bad syntax."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        match = _PARAM.match(word)
        if not match:
            raise SMTPError(501, "5.5.4", f"Syntax error in parameter {word[:40]!r}")
        key = match.group(1).upper()
        if key in params:
            raise SMTPError(501, "5.5.4", f"Parameter {key} given twice")
        params[key] = match.group(2)
    return params


# --- DATA --------------------------------------------------------------------


class MessageReader:
    """Collects a DATA body from whole network buffers until CRLF.CRLF.

    Only CRLF.CRLF ends the data: `\\n.\\n`, `\\r.\\r` and the other smuggling
    shapes are just bytes of the message (refused later by `check_body`). Past
    `limit` octets the bytes are counted and dropped, so an oversized message
    is read to its real end and the session goes on; past `cap` octets (if
    given) the reader says `overflowed`, for the caller to stop reading.
    """

    def __init__(self, limit: int, cap: int | None = None) -> None:
        # A CRLF in front makes a "." on the first line match END_OF_DATA too.
        self._buffer = bytearray(b"\r\n")
        self._limit = limit
        self._cap = cap
        self._dropped = 0
        self.body: bytes | None = None

    @property
    def size(self) -> int:
        return self._dropped + len(self._buffer) - 2

    @property
    def oversized(self) -> bool:
        return self.size > self._limit

    @property
    def overflowed(self) -> bool:
        """More than `cap` octets and no end in sight: not worth reading on."""
        return self._cap is not None and self.body is None and self.size > self._cap

    def feed(self, data: bytes) -> int:
        """Take a buffer; return how many of its bytes belong to the message
        (all of them, until the end is seen; then `body` is set)."""
        start = len(self._buffer)
        self._buffer += data
        end = self._buffer.find(END_OF_DATA, max(start - 4, 0))
        if end < 0:
            if self.oversized:
                keep = 4  # enough to hold a terminator split across buffers
                self._dropped += len(self._buffer) - keep
                del self._buffer[:-keep]
            return len(data)
        # body keeps the leading CRLF and the CRLF that ends its last line.
        self.body = bytes(self._buffer[: end + 2])
        del self._buffer[end + 2 :]
        return end + len(END_OF_DATA) - start


def check_body(body: bytes) -> Reply | None:
    """Strict checks on a received body (as kept by MessageReader); None when it is clean."""
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        return Reply(550, "5.6.11", "Message refused: bare CR or LF in DATA (RFC 5321 2.3.8)")
    if b"\x00" in body:
        return Reply(550, "5.6.0", "Message refused: NUL character in DATA")
    # Lines are CRLF-separated here (checked above); a split is C-speed.
    if len(body) > TEXT_LINE_MAX and max(map(len, body.split(b"\r\n"))) > TEXT_LINE_MAX - 2:
        return Reply(500, "5.5.6", f"Message refused: line longer than {TEXT_LINE_MAX} octets")
    return None


def unstuff_to_lf(body: bytes) -> bytes:
    """Undo dot-stuffing and turn CRLF into LF: the form a Maildir file holds."""
    return body.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")[1:]


def stuff_from_lf(message: bytes) -> bytes:
    """A stored message (LF or CRLF lines) as DATA on the wire: every line
    ending in CRLF, every leading dot doubled, then the terminating dot.

    Whole-buffer work, so a dot can never escape stuffing at a chunk boundary.
    """
    wire = (b"\n" + _lf_lines(message)).replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
    return wire[2:] + b".\r\n"


# --- DSN parameters (RFC 3461) -------------------------------------------------

NOTIFY_NEVER = "NEVER"
NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")
ENVID_MAX = 100  # characters of the decoded ENVID (RFC 3461 4.4)
ORCPT_MAX = 500  # characters of the ORCPT value as sent (RFC 3461 4.2)
_HEX = "0123456789ABCDEFabcdef"
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def xtext_decode(text: str) -> str:
    """RFC 3461 4: `+XX` is the octet XX, every other character is itself (only "!" to
    "~" without "+" and "="); ValueError on anything else."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise ValueError("bad +XX escape in xtext")
            out.append(chr(int(pair, 16)))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            raise ValueError("character not allowed in xtext")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """The xtext form of an ASCII `text`: "+", "=" and anything outside "!".."~" as +XX."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else f"+{ord(ch):02X}" for ch in text)


def _dsn_error(text: str) -> SMTPError:
    return SMTPError(501, "5.5.4", text)


def parse_notify(value: str | None) -> tuple[str, ...]:
    """NOTIFY=NEVER, or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1)."""
    words = [word.upper() for word in (value or "").split(",")]
    if words == [NOTIFY_NEVER]:
        return (NOTIFY_NEVER,)
    if not value or any(word not in NOTIFY_EVENTS for word in words) or len(set(words)) != len(words):
        raise _dsn_error("Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (RFC 3461 4.1)")
    return tuple(event for event in NOTIFY_EVENTS if event in words)


def parse_orcpt(value: str | None) -> str:
    """ORCPT=addr-type;xtext (RFC 3461 4.2) -> "addr-type;decoded address"."""
    addr_type, _, encoded = (value or "").partition(";")
    try:
        if not encoded or len(value or "") > ORCPT_MAX or not _ADDR_TYPE.fullmatch(addr_type):
            raise ValueError(value)
        address = xtext_decode(encoded)
    except ValueError:
        raise _dsn_error("Syntax: ORCPT=addr-type;xtext (RFC 3461 4.2)") from None
    if not address.isprintable() or not address.isascii():
        raise _dsn_error("ORCPT address must be printable ASCII (RFC 3461 4.2)")
    return f"{addr_type.lower()};{address}"


def format_orcpt(orcpt: str) -> str:
    """A stored "addr-type;address" as the ORCPT parameter's value again."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"


def parse_ret(value: str | None) -> str:
    if value is None or value.upper() not in RET_VALUES:
        raise _dsn_error("Syntax: RET=FULL or RET=HDRS (RFC 3461 4.3)")
    return value.upper()


def parse_envid(value: str | None) -> str:
    """ENVID=xtext (RFC 3461 4.4) -> the decoded id: at most 100 printable ASCII characters."""
    try:
        envid = xtext_decode(value or "")
    except ValueError:
        envid = ""
    if not envid or len(envid) > ENVID_MAX or not envid.isascii() or not envid.isprintable():
        raise _dsn_error(f"Syntax: ENVID=xtext, at most {ENVID_MAX} printable characters (RFC 3461 4.4)")
    return envid


# --- BDAT (RFC 3030) -------------------------------------------------------------

CHUNK_SIZE_DIGITS = 18  # a chunk size with more digits is not a size any host would take


def parse_bdat(argument: str) -> tuple[int, bool]:
    """`BDAT chunk-size [LAST]` -> (size, last); ValueError on bad syntax."""
    words = argument.split(" ")
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or not words[0].isascii() \
            or len(words[0]) > CHUNK_SIZE_DIGITS or (len(words) == 2 and words[1].upper() != "LAST"):
        raise ValueError(argument)
    return int(words[0]), len(words) == 2


def chunked_to_lf(body: bytes) -> bytes:
    """A BDAT message as check_body wants it and as a Maildir file holds it: BDAT has no
    dot-stuffing (RFC 3030 2), so only the line endings change.

    `body` is the check_body form: a leading CRLF, and a CRLF at the end of the last line."""
    return body.replace(b"\r\n", b"\n")[1:]


def crlf_from_lf(message: bytes) -> bytes:
    """A stored message as one BDAT chunk: every line ending in CRLF, no dot-stuffing."""
    return _lf_lines(message).replace(b"\n", b"\r\n")


def _lf_lines(message: bytes) -> bytes:
    """`message` with every line ending (CRLF, CR, LF) as LF, the last line ended too."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text
