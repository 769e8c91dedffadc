"""Header-block and address helpers, one copy for every module that reads a message.

A stored message has LF line endings (the codec normalised it). Its header block
is everything up to and including the LF before the first empty line; a message
that starts with an empty line has no header block.

parse_header_section and parse_address_list are the one reading of a header section
and of an address list (RFC 5322, obsolete syntax included): pure functions of their
input that never raise, so every check sees the fields a mail reader sees.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

HOP_LIMIT = 50  # Received: headers; more means a mail loop (RFC 5321 6.3)

# The fields that say who wrote or sent a message (RFC 5322 3.6.2, 3.6.6). Reply-To: is where
# answers go, not a claim of authorship.
ORIGINATOR_FIELDS = ("from", "sender", "resent-from", "resent-sender")

# The words of an originator value the parser cannot read; those with an @ inside count as
# addresses. (Words, then a test for @: a regex that looks for the @ itself backtracks, and
# takes minutes on a long value without one.)
_WORD = re.compile(r"[^\s<>,;:\"()\x00-\x1f\x7f]+")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE)
_FIELD_START = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) of `address`; the domain is "" when there is no @."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def domain_of(address: str) -> str:
    """The domain of `address`, lower case ("" when it has none)."""
    return split_address(address)[1].lower()


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block, the rest: the empty line and the body). An empty line is LF or CRLF,
    so a message still in its wire form splits the same way."""
    if message.startswith((b"\n", b"\r\n")):
        return b"", message
    ends = [at for at in (message.find(b"\n\n"), message.find(b"\n\r\n")) if at >= 0]
    if not ends:
        return message, b""
    end = min(ends)
    return message[: end + 1], message[end + 1:]


def header_block(message: bytes) -> bytes:
    return split_message(message)[0]


# --- the header section: RFC 5322 2.2 and 3.6.8, with 4.5's obsolete syntax --------------------
#
# Read as mail readers and Postfix read it, not as the stdlib's compat32 parser does (that one
# takes "Received : x" or a non-ASCII field name as the start of the body, so every field after
# it went unseen). A field name is printable US-ASCII but the colon, white space may come before
# the colon (obs-optional), a line starting with white space continues the field before it, and
# the section ends at the first empty line. A line that is none of these is recorded as making
# the section ambiguous; the fields around it are still read.

_EMPTY_LINE = re.compile(rb"\n\r?\n")
# One field with its continuation lines (name: ftext, RFC 5322 3.6.8; [ \t]* before the colon:
# obs-optional, 4.5), or any other line with the continuation lines that follow it.
_FIELD_OR_LINE = re.compile(rb"""
    (?P<name>[\x21-\x39\x3b-\x7e]+)[ \t]*:(?P<value>[^\n]*(?:\n[ \t][^\n]*)*)
  | (?P<other>[^\n]*(?:\n[ \t][^\n]*)*)
""", re.VERBOSE)
_FOLD = re.compile(rb"\r?\n")
_MALFORMED_KEPT = 5  # reasons recorded; one is enough to refuse, a few help a reader


@dataclass(frozen=True)
class HeaderField:
    name: str  # as written, US-ASCII, without the white space before the colon
    value: bytes  # after the colon to the end of its last line: continuation lines included, no final line end
    line: int  # the number of its first line, from 1

    @property
    def text(self) -> str:
        """The value unfolded (RFC 5322 2.2.3: a line end before white space goes), as text,
        without the white space around it."""
        return _FOLD.sub(b"", self.value).decode("utf-8", "replace").strip(" \t")


@dataclass(frozen=True)
class HeaderSection:
    """The fields of a header section, in order, and whether it reads one way only."""

    fields: tuple[HeaderField, ...] = ()
    end: int = 0  # offset of the empty line that ends the section (the message's length when none does)
    malformed: tuple[str, ...] = ()  # why it cannot be read unambiguously (the first few); () when it can

    def all(self, name: str) -> list[HeaderField]:
        """The fields called `name` (case does not matter), in order."""
        name = name.lower()
        return [field for field in self.fields if field.name.lower() == name]

    def get(self, name: str) -> str | None:
        """The text of the first field called `name`; None when there is none."""
        found = self.all(name)
        return found[0].text if found else None

    def names(self) -> set[str]:
        """The lower-case names of the fields present."""
        return {field.name.lower() for field in self.fields}


def _header_end(message: bytes) -> int:
    """Where the header section of `message` ends: the offset of the empty line that ends it
    (RFC 5322 2.1), 0 when the message starts with one, the message's length when none does."""
    if message.startswith((b"\n", b"\r\n")):
        return 0
    empty = _EMPTY_LINE.search(message)
    return empty.start() + 1 if empty else len(message)


def parse_header_section(message: bytes) -> HeaderSection:
    """The header section of `message` (LF or CRLF line endings). A pure function that never
    raises: whatever it cannot read goes into `malformed`."""
    end = _header_end(message)
    fields: list[HeaderField] = []
    malformed: list[str] = []
    pos, number = 0, 1
    while pos < end:
        match = _FIELD_OR_LINE.match(message, pos, end)
        name = match["name"]
        if name is not None:
            stop = match.end("value")
            if message[stop - 1:stop] == b"\r":
                stop -= 1  # CRLF
            fields.append(HeaderField(name.decode("ascii"), message[match.start("value"):stop], number))
        elif len(malformed) < _MALFORMED_KEPT:
            line = match["other"]
            colon = line.find(b":")
            if line[:1] in (b" ", b"\t"):
                malformed.append(f"line {number} begins with white space but continues no header field")
            elif colon >= 0 and not line[:colon].isascii():
                malformed.append(f"line {number} has a header field name that is not US-ASCII")
            else:
                malformed.append(f"line {number} is neither a header field nor the continuation of one")
        number += message.count(b"\n", pos, match.end()) + 1
        pos = match.end() + 1  # past the line end
    return HeaderSection(tuple(fields), end, tuple(malformed))


@functools.lru_cache(maxsize=16)
def _field_start(name: str) -> re.Pattern[bytes]:
    # A line that starts field `name` (obs-optional white space before the colon), with its
    # continuation lines: what _FIELD_OR_LINE takes as that field, since every line that does
    # not start with white space starts a field or another line there.
    return re.compile(rb"^" + re.escape(name.encode("ascii")) + rb"[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)",
                      re.IGNORECASE | re.MULTILINE)


def first_field_text(message: bytes, name: str) -> str | None:
    """parse_header_section(message).get(name), found without reading every other field:
    for what each delivery asks of its message (its Message-ID for the event log)."""
    match = _field_start(name).search(message, 0, _header_end(message))
    if match is None:
        return None
    value = match[1]
    if value.endswith(b"\r"):
        value = value[:-1]  # CRLF
    return HeaderField(name, value, 0).text


def read_headers(message: bytes) -> HeaderSection:
    """The header section of a stored message (parse_header_section; never raises)."""
    return parse_header_section(message)


def field_names(message: bytes) -> set[str]:
    """The lower-case names of the header fields present."""
    return parse_header_section(message).names()


def has_fields(message: bytes, names: tuple[bytes, ...]) -> bool:
    """Whether every field in `names` (lower case, e.g. b"date") starts a line of the header
    block: a fast check for the hot path; "no" may be wrong for odd spellings (white space
    before the colon), so callers then parse the block properly."""
    block = header_block(message).lower()
    return all(block.startswith(name + b":") or b"\n" + name + b":" in block for name in names)


def normalize_address(address: str) -> str:
    """`address` as compared: the domain without the root's final dot and in lower case (the
    local part as it is: who owns it decides about its case)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.rstrip('.').lower()}" if at else address


def claimed_addresses(text: str) -> tuple[list[str], bool]:
    """The addresses a field body names (normalised) and whether it is an address list.

    A body that is not counts as claiming every address-like word in it (in its first
    _LONGEST_LIST characters: the work stays bounded, and it is not an address list anyway),
    so a mangled header cannot slip a local address past a check.
    """
    addresses = parse_address_list(text)
    if addresses is not None:
        return addresses, True
    words = _WORD.findall(text, 0, _LONGEST_LIST)
    return [normalize_address(word) for word in words if "@" in word[1:-1]], False


def from_addresses(headers: HeaderSection) -> list[str]:
    """Every address in every From: header (normalised; see claimed_addresses)."""
    return [address for field in headers.all("From") for address in claimed_addresses(field.text)[0]]


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From: address, lower case; None when there is none."""
    for address in from_addresses(parse_header_section(message)):
        return domain_of(address)
    return None


# --- address lists: RFC 5322 3.4 with 4.4's obsolete syntax ----------------------------------
#
# Strict where a reader could see another address than we do (a body that is not an address
# list is "None", for the caller to refuse or to fall back on), lenient where RFC 5322's
# obsolete syntax or the root's final dot in a domain name leave no doubt. RFC 6532: non-ASCII
# is text in atoms and quoted strings.

_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<atom>[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]+)      # atext, RFC 6532's too
  | "(?P<quoted>(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*)"   # quoted-string
  | \[(?P<literal>[^\[\]\\\x00-\x08\x0a-\x1f\x7f]*)\]                     # domain-literal
  | (?P<special>[<>@,;:.])
  | (?P<comment>\()
""", re.VERBOSE)
_QUOTED_PAIR = re.compile(r"\\(.)")
_PAREN = re.compile(r"[()\\]")
_WORDS = ("atom", "quoted")
_LONGEST_LIST = 20_000  # characters: some 20 full lines; originator fields are far shorter
_DEEPEST_COMMENT = 50


class _Unreadable(Exception):
    pass


def _skip_comment(text: str, at: int) -> int:
    """The offset just past the comment that starts at `at` (nested, with quoted-pairs; RFC 5322 3.2.2)."""
    depth = 0
    while True:
        paren = _PAREN.search(text, at)
        if paren is None:
            raise _Unreadable("unterminated comment")
        char, at = paren.group(), paren.end()
        if char == "\\":
            at += 1
        elif char == "(":
            depth += 1
            if depth > _DEEPEST_COMMENT:
                raise _Unreadable("comments nested too deep")
        else:
            depth -= 1
            if depth == 0:
                return at


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) for each lexical token; comments and white space (CFWS) dropped, quoted
    strings given as their content."""
    out: list[tuple[str, str]] = []
    at, size = 0, len(text)
    while at < size:
        match = _TOKEN.match(text, at)
        if match is None:
            raise _Unreadable(f"unexpected {text[at]!r}")
        kind = match.lastgroup
        if kind == "comment":
            at = _skip_comment(text, at)
            continue
        if kind == "quoted":
            out.append(("quoted", _QUOTED_PAIR.sub(r"\1", match["quoted"])))
        elif kind == "literal":
            out.append(("literal", "[" + "".join(match["literal"].split()) + "]"))
        elif kind == "special":
            out.append((match["special"], match["special"]))
        elif kind == "atom":
            out.append(("atom", match["atom"]))
        at = match.end()
    return out


class _AddressParser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at][0] if self.at < len(self.tokens) else None

    def take(self, *kinds: str) -> str:
        if self.peek() not in kinds:
            raise _Unreadable(f"expected {kinds}")
        self.at += 1
        return self.tokens[self.at - 1][1]

    def address_list(self) -> list[str]:
        """address-list / obs-addr-list (empty elements allowed); "" is the empty list."""
        found: list[str] = []
        while True:
            while self.peek() == ",":
                self.at += 1
            if self.peek() is None:
                return found
            found.extend(self.address(in_group=False))
            if self.peek() is not None:
                self.take(",")

    def address(self, in_group: bool) -> list[str]:
        """A mailbox (name-addr or addr-spec), or a group and its members."""
        words = self.phrase()
        kind = self.peek()
        if kind == "@":
            return [self.addr_spec(words)]
        if kind == "<":
            self.at += 1
            if self.peek() in ("@", ","):
                self.route()
            address = self.addr_spec(self.phrase())
            self.take(">")
            return [address]
        if kind == ":" and words and not in_group:  # a group (RFC 5322 3.4); groups do not nest
            self.at += 1
            members: list[str] = []
            while True:
                while self.peek() == ",":
                    self.at += 1
                if self.peek() == ";":
                    self.at += 1
                    return members
                members.extend(self.address(in_group=True))
                if self.peek() != ";":
                    self.take(",")
        raise _Unreadable("not a mailbox")

    def phrase(self) -> list[tuple[str, str]]:
        """Words and dots: a display name (obs-phrase) or a local part (obs-local-part)."""
        words: list[tuple[str, str]] = []
        while self.peek() in (*_WORDS, "."):
            words.append(self.tokens[self.at])
            self.at += 1
        if words and words[0][0] == ".":
            raise _Unreadable("a phrase starts with a dot")
        return words

    def addr_spec(self, local_words: list[tuple[str, str]]) -> str:
        """local-part "@" domain; the local part is word *("." word)."""
        if not local_words or len(local_words) % 2 == 0:
            raise _Unreadable("no local part")
        for index, (kind, _) in enumerate(local_words):
            if (kind == ".") != (index % 2 == 1):
                raise _Unreadable("bad local part")
        local = "".join(value for _, value in local_words)
        self.take("@")
        return normalize_address(f"{local}@{self.domain()}")

    def domain(self) -> str:
        """dot-atom / obs-domain / domain-literal; one final dot (the root) is let through."""
        if self.peek() == "literal":
            return self.take("literal")
        labels = [self.take("atom")]
        while self.peek() == ".":
            self.at += 1
            if self.peek() != "atom":
                if self.peek() == ".":
                    raise _Unreadable("empty label")
                break
            labels.append(self.take("atom"))
        return ".".join(labels)

    def route(self) -> None:
        """obs-route: "@a,@b:" before the address in <...>, read and dropped (RFC 5322 4.4)."""
        while self.peek() == ",":
            self.at += 1
        self.take("@")
        self.domain()
        while self.peek() == ",":
            self.at += 1
            if self.peek() == "@":
                self.at += 1
                self.domain()
        self.take(":")


def parse_address_list(text: str) -> list[str] | None:
    """The addresses (normalised) an address-list field body names, group members included;
    None when `text` is not an address list (or longer than _LONGEST_LIST characters). A pure
    function that never raises."""
    if len(text) > _LONGEST_LIST:
        return None
    try:
        return _AddressParser(_tokens(text)).address_list()
    except _Unreadable:
        return None


def original_headers(message: bytes) -> bytes:
    """The header block of `message`: its lines up to (not including) the
    empty line that ends it, line endings as they are.

    The block also ends, as in `email`'s parser, at the first line that is
    neither a field nor a continuation (a message without the empty line);
    a message that is all headers is returned whole.
    """
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        stop = end if nl < 0 else nl + 1
        line = message[pos:stop]
        bare = line.rstrip(b"\r\n")
        if not bare:
            break  # the empty line
        if bare[:1] in (b" ", b"\t"):
            if pos == 0:
                break  # a continuation with nothing to continue
        elif not _FIELD_START.match(bare):
            break
        pos = stop
    return message[:pos]


def received_count(message: bytes) -> int:
    """How many Received: fields the header block of `message` has (for the
    RFC 5321 6.3 loop rule), the field name compared without case."""
    return sum(1 for line in original_headers(message).split(b"\n") if _RECEIVED.match(line))


def too_many_hops(message: bytes) -> bool:
    """More Received: fields than HOP_LIMIT (RFC 5321 6.3: a mail loop). The word's count up
    to the first empty line is an upper bound that settles the usual case without parsing the
    header block."""
    ends = [at for at in (message.find(b"\n\n"), message.find(b"\n\r\n")) if at >= 0]
    head = message[: min(ends) + 1] if ends else message
    if head.lower().count(b"received") <= HOP_LIMIT:
        return False
    return received_count(message) > HOP_LIMIT


def drop_field(block: bytes, name: bytes) -> bytes:
    """`block` without any `name:` field (with its continuation lines); `name` lower case."""
    out, skipping = [], False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"".join(out)
