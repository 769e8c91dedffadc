"""The policy decisions (mailhost.intake.policy over mailbox.LocalDomains), table-driven.

RCPT: each row is the address a client gives in RCPT TO, the reply code and
enhanced status code it gets, and the set of local mailboxes the mail would go
to. Relay: role x authenticated x client network x recipient -> reply. Sender
ownership: authenticated user x MAIL FROM (or From:) -> allowed or 553 5.7.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhost.config import Config, load
from mailhost.local.mailbox import LocalDomains
from mailhost.intake.policy import (auth_required, check_header_senders, check_key_sender, check_originators,
                                    check_recipient, check_sender, may_relay)
from mailhost.message import parse_header_section
from mailhost.smtp.wire import Address, SMTPError, parse_path
from mailhost.local.users import UserEntry, hash_password, write_users

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
[domain.aliases]
team = ["alice", "bob"]
both = ["alice", "team", "Alice", "bob@example.test"]
staff = ["team"]
everyone = ["staff", "carol", "bob"]
sales = ["alice", "bob@Example.TEST"]
cross = ["dave@other.test"]
forward = ["someone@remote.test"]
mixed = ["alice", "someone@remote.test"]
Upper = ["alice"]
plus_target = ["alice+lists"]
ghost = ["nobody"]
ghost_full = ["nobody@example.test"]

[[domain]]
name = "other.test"
maildir = "mail/other.test"
users = "users"
catch_all = "carol"
[domain.aliases]
postmaster = ["dave"]
"""

USERS = ["alice@example.test", "bob@example.test", "carol@example.test", "carol@other.test", "dave@other.test"]
NEWS = "news@example.test"  # a campaign account with may_send_as

LOOPS = """
[[domain]]
name = "loop.test"
maildir = "mail/loop.test"
users = "users"
[domain.aliases]
loop1 = ["loop2"]
loop2 = ["loop1"]
self = ["self"]
far1 = ["far2@loop.test"]
far2 = ["far1@loop.test"]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("policy")
    (root / "mailhost.toml").write_text(CONFIG + LOOPS)
    password_hash = hash_password("not used here")
    entries = {a: UserEntry(a, password_hash) for a in USERS}
    entries[NEWS] = UserEntry(NEWS, password_hash, may_send_as=("info@example.test", "@campaign.test"))
    write_users(root / "users", entries)
    return load(root / "mailhost.toml")


@pytest.fixture(scope="module")
def domains(config: Config) -> LocalDomains:
    return LocalDomains(config)


def rcpt(text: str) -> Address:
    address, rest = parse_path(f"<{text}>", utf8=False, null_ok=False, kind="recipient")
    assert rest == ""
    return address


OK = (250, "2.1.5")
UNKNOWN = (550, "5.1.1")
RELAY_DENIED = (554, "5.7.1")

A, B, C = "alice@example.test", "bob@example.test", "carol@example.test"
CATCH_ALL = {"carol@other.test"}

TABLE = [
    # users
    ("alice@example.test", OK, {A}),
    ("Alice@EXAMPLE.test", OK, {A}),
    ("ALICE@example.TEST", OK, {A}),
    ('"alice"@example.test', OK, {A}),  # quoted and unquoted forms are the same local part
    ('"al\\ice"@example.test', OK, {A}),  # a quoted-pair stands for its character
    ('"postmaster"@example.test', OK, {"postmaster@example.test"}),
    ('"alice+../../x"@example.test', OK, {A}),
    ('"../alice+x"@example.test', UNKNOWN, set()),
    ("carol@example.test", OK, {C}),
    ("dave@other.test", OK, {"dave@other.test"}),
    # plus-addressing
    ("alice+news@example.test", OK, {A}),
    ("Alice+News@example.test", OK, {A}),
    ("alice+a+b@example.test", OK, {A}),
    ("alice+@example.test", OK, {A}),
    ("team+list@example.test", OK, {A, B}),
    # aliases: several users, deduplicated, chains, across local domains
    ("team@example.test", OK, {A, B}),
    ("TEAM@example.test", OK, {A, B}),
    ("upper@example.test", OK, {A}),
    ("both@example.test", OK, {A, B}),
    ("staff@example.test", OK, {A, B}),
    ("everyone@example.test", OK, {A, B, C}),
    ("sales@example.test", OK, {A, B}),
    ("cross@example.test", OK, {"dave@other.test"}),
    ("plus_target@example.test", OK, {A}),  # a plus-address as target is alice's, not a Maildir "alice+lists"
    # an alias to a local name that is no user leads nowhere, written either way
    ("ghost_full@example.test", UNKNOWN, set()),
    ("ghost@example.test", UNKNOWN, set()),
    # aliases to remote addresses: those go to the outbound queue (see REMOTE)
    ("forward@example.test", OK, set()),
    ("mixed@example.test", OK, {A}),
    # postmaster is always accepted
    ("postmaster@example.test", OK, {"postmaster@example.test"}),
    ("PostMaster@Example.Test", OK, {"postmaster@example.test"}),
    ("postmaster@other.test", OK, {"dave@other.test"}),
    ("postmaster@loop.test", OK, {"postmaster@loop.test"}),
    # unknown local parts: refused, unless a catch-all takes them
    ("nobody@example.test", UNKNOWN, set()),
    ("nobody+alice@example.test", UNKNOWN, set()),
    ("dave@example.test", UNKNOWN, set()),  # a user of another domain in the same users file
    ("alicex@example.test", UNKNOWN, set()),
    ('"alice "@example.test', UNKNOWN, set()),
    ("nobody@other.test", OK, CATCH_ALL),
    ("nobody+tag@other.test", OK, CATCH_ALL),
    # not local: never relayed
    ("alice@remote.test", RELAY_DENIED, set()),
    ("alice@example.test.remote.test", RELAY_DENIED, set()),
    ("alice@sub.example.test", RELAY_DENIED, set()),
    ("alice@[127.0.0.1]", RELAY_DENIED, set()),
    ("alice@[192.0.2.1]", RELAY_DENIED, set()),
    ("alice@[IPv6:::1]", RELAY_DENIED, set()),
    ("postmaster@[127.0.0.1]", RELAY_DENIED, set()),
    ("alice@[x-tag:example.test]", RELAY_DENIED, set()),
    # source routes are dropped, never followed
    ("@example.test:u@remote.test", RELAY_DENIED, set()),
    ("@remote.test:alice@example.test", OK, {A}),
    ("@remote.test,@example.test:alice@example.test", OK, {A}),
    # the relay tricks: % ! and quoted @ are just characters of a local part
    ("u%remote.test@example.test", UNKNOWN, set()),
    ("u%remote.test@other.test", OK, CATCH_ALL),
    ("alice%remote.test@example.test", UNKNOWN, set()),
    ("remote.test!u@example.test", UNKNOWN, set()),
    ("remote.test!u@other.test", OK, CATCH_ALL),
    ('"u@remote.test"@example.test', UNKNOWN, set()),
    ('"u@remote.test"@other.test', OK, CATCH_ALL),
    ('"alice@example.test"@example.test', UNKNOWN, set()),
    ('"u%remote.test"@example.test', UNKNOWN, set()),
    ('"@remote.test:u"@example.test', UNKNOWN, set()),
    # local parts that would escape the maildir
    ('"../alice"@example.test', UNKNOWN, set()),
    ('"a/b"@example.test', UNKNOWN, set()),
    ('".."@example.test', UNKNOWN, set()),
    ('"alice/../bob"@example.test', UNKNOWN, set()),
    ('"../../etc"@other.test', OK, CATCH_ALL),
    ('""@example.test', UNKNOWN, set()),
]


# Aliases that forward off-site, by the recipient that reaches them.
REMOTE = {"forward@example.test": ["someone@remote.test"], "mixed@example.test": ["someone@remote.test"]}


@pytest.mark.parametrize("text, reply, mailboxes", TABLE, ids=[row[0] for row in TABLE])
def test_check_recipient(domains: LocalDomains, config: Config, text: str, reply: tuple[int, str], mailboxes: set[str]) -> None:
    verdict = check_recipient(rcpt(text), domains)
    assert (verdict.reply.code, verdict.reply.status) == reply, verdict.reply
    assert verdict.accepted is (reply[0] == 250)
    if not verdict.accepted:
        assert verdict.resolution is None
        return
    resolution = verdict.resolution
    assert resolution.remote == REMOTE.get(text, [])  # only configured forwards go off-site
    got = [m.address for m in resolution.mailboxes]
    assert len(got) == len(set(got)), got  # each mailbox once
    assert set(got) == mailboxes
    for mailbox in resolution.mailboxes:
        local, _, domain = mailbox.address.partition("@")
        root = config.domain(domain).maildir
        assert mailbox.path == root / local
        assert mailbox.path.resolve().parent == root.resolve()  # inside that domain's maildir


RELAY_TABLE = [
    # (client may relay, recipient, reply, remote recipients when accepted)
    (False, "bob@remote.test", RELAY_DENIED, None),
    (True, "bob@remote.test", OK, ["bob@remote.test"]),
    (True, "Bob@Remote.TEST", OK, ["Bob@Remote.TEST"]),
    (False, "u@[127.0.0.2]", RELAY_DENIED, None),
    (True, "u@[127.0.0.2]", (550, "5.1.2"), None),
    (False, "alice@[127.0.0.1]", RELAY_DENIED, None),
    (True, "alice@example.test", OK, []),
    (False, "alice@example.test", OK, []),
    (True, "u%remote.test@example.test", UNKNOWN, None),
    (False, "@example.test:u@remote.test", RELAY_DENIED, None),
    (True, "@example.test:u@remote.test", OK, ["u@remote.test"]),
    (False, "forward@example.test", OK, ["someone@remote.test"]),  # the operator's own forward
]


@pytest.mark.parametrize("may_relay, text, reply, remote", RELAY_TABLE, ids=[f"{r[0]}-{r[1]}" for r in RELAY_TABLE])
def test_relay_decision(domains: LocalDomains, may_relay: bool, text: str, reply: tuple[int, str], remote: list[str] | None) -> None:
    verdict = check_recipient(rcpt(text), domains, may_relay)
    assert (verdict.reply.code, verdict.reply.status) == reply, verdict.reply
    if remote is None:
        assert not verdict.accepted
    else:
        assert verdict.resolution.remote == remote


@pytest.mark.parametrize(
    "text",
    [
        "<u@remote.test@example.test>",
        "<alice@example.test@remote.test>",
        "<u@remote.test,@example.test>",
        "<@remote.test:u@remote.test:alice@example.test>",
    ],
)
def test_relay_tricks_that_must_not_parse(domains: LocalDomains, text: str) -> None:
    try:
        address, _ = parse_path(text, utf8=False, null_ok=False, kind="recipient")
    except SMTPError as e:
        assert (e.reply.code, e.reply.status) == (501, "5.1.3")
    else:  # if it ever parses, it must still not go anywhere remote
        verdict = check_recipient(address, domains)
        assert verdict.resolution is None or verdict.resolution.remote == []


@pytest.mark.parametrize("text", ["loop1@loop.test", "loop2@loop.test", "self@loop.test", "far1@loop.test"])
def test_alias_loop_reaches_no_mailbox(domains: LocalDomains, text: str) -> None:
    # A loop of aliases with no user in it leads nowhere: refuse it, and
    # never invent a Maildir named after an alias.
    verdict = check_recipient(rcpt(text), domains)
    assert not verdict.accepted, [m.address for m in verdict.resolution.mailboxes]
    assert verdict.reply.code == 550


def test_new_users_are_seen_without_restart(tmp_path: Path) -> None:
    (tmp_path / "mailhost.toml").write_text(CONFIG)
    users = tmp_path / "users"
    write_users(users, {A: UserEntry(A, "$scrypt$x")})
    domains = LocalDomains(load(tmp_path / "mailhost.toml"))
    assert check_recipient(rcpt("zoe@example.test"), domains).reply.code == 550
    write_users(users, {A: UserEntry(A, "$scrypt$x"), "zoe@example.test": UserEntry("zoe@example.test", "$scrypt$x")})
    verdict = check_recipient(rcpt("zoe@example.test"), domains)
    assert verdict.accepted and [m.address for m in verdict.resolution.mailboxes] == ["zoe@example.test"]
    write_users(users, {A: UserEntry(A, "$scrypt$x")})
    assert check_recipient(rcpt("zoe@example.test"), domains).reply.code == 550


# --- role x authenticated x client network x recipient -------------------------

AUTH_NEEDED = (530, "5.7.0")
LITERAL = (550, "5.1.2")

ROLE_TABLE = [
    # (role, authenticated, client in relay.networks, recipient, reply)
    ("mx", False, False, "alice@example.test", OK),
    ("mx", False, False, "bob@remote.test", RELAY_DENIED),
    ("mx", False, False, "u@[127.0.0.2]", RELAY_DENIED),
    ("mx", False, False, "nobody@example.test", UNKNOWN),
    ("mx", False, True, "alice@example.test", OK),
    ("mx", False, True, "bob@remote.test", OK),
    ("mx", False, True, "u@[127.0.0.2]", LITERAL),
    # the submission roles: nothing at all before AUTH, relay.networks or not
    ("submission", False, False, "alice@example.test", AUTH_NEEDED),
    ("submission", False, False, "bob@remote.test", AUTH_NEEDED),
    ("submission", False, True, "alice@example.test", AUTH_NEEDED),
    ("submission", False, True, "bob@remote.test", AUTH_NEEDED),
    ("submissions", False, False, "alice@example.test", AUTH_NEEDED),
    ("submissions", False, True, "bob@remote.test", AUTH_NEEDED),
    # an authenticated user sends anywhere, from any network
    ("submission", True, False, "alice@example.test", OK),
    ("submission", True, False, "bob@remote.test", OK),
    ("submission", True, True, "bob@remote.test", OK),
    ("submissions", True, False, "bob@remote.test", OK),
    ("submissions", True, False, "team@example.test", OK),
    # ...but still not to unknown local users, literals, or relay tricks
    ("submission", True, False, "nobody@example.test", UNKNOWN),
    ("submission", True, False, "u@[127.0.0.2]", LITERAL),
    ("submission", True, False, "u%remote.test@example.test", UNKNOWN),
    ("submissions", True, False, '"u@remote.test"@example.test', UNKNOWN),
]


@pytest.mark.parametrize(
    "role, authenticated, in_networks, text, reply", ROLE_TABLE,
    ids=[f"{r[0]}-{'auth' if r[1] else 'anon'}-{'net' if r[2] else 'outside'}-{r[3]}" for r in ROLE_TABLE],
)
def test_role_relay_decision(domains: LocalDomains, role: str, authenticated: bool, in_networks: bool, text: str,
                             reply: tuple[int, str]) -> None:
    # The session asks in this order: AUTH first (MAIL and RCPT), then the recipient.
    got = auth_required(role, authenticated, tls=True) or check_recipient(
        rcpt(text), domains, may_relay(role, authenticated, in_networks)).reply
    assert (got.code, got.status) == reply, got


def test_auth_required_says_starttls_first_before_tls() -> None:
    reply = auth_required("submission", False, tls=False)
    assert reply is not None and (reply.code, reply.status) == AUTH_NEEDED and "STARTTLS" in reply.text
    assert auth_required("mx", False, tls=False) is None


# --- sender ownership ----------------------------------------------------------

SENDER_TABLE = [
    # (authenticated user, MAIL FROM, allowed)
    (A, "alice@example.test", True),
    (A, "Alice@Example.TEST", True),
    (A, '"alice"@example.test', True),
    (A, "alice+news@example.test", True),
    (A, "", True),  # <>
    (A, "team@example.test", True),  # an alias that reaches alice
    (A, "team+list@example.test", True),
    (A, "everyone@example.test", True),  # through a chain of aliases
    (A, "sales@example.test", True),
    (A, "mixed@example.test", True),  # alice and a remote address
    (A, "plus_target@example.test", True),  # an alias to alice+lists
    (A, "bob@example.test", False),
    (A, "bob+alice@example.test", False),
    (A, "alicex@example.test", False),
    (A, "alice@other.test", False),
    (A, "alice@remote.test", False),
    (A, "alice@[127.0.0.1]", False),
    (A, "forward@example.test", False),  # an alias that only forwards off-site
    (A, "cross@example.test", False),  # an alias to someone else
    (A, "postmaster@example.test", False),  # postmaster's own Maildir, not alice's
    (A, "info@example.test", False),  # news may; alice may not
    ("dave@other.test", "cross@example.test", True),  # an alias in another local domain
    ("dave@other.test", "postmaster@other.test", True),
    ("carol@other.test", "carol@other.test", True),
    ("carol@other.test", "nobody@other.test", False),  # a catch-all grants no sender rights
    # may_send_as widens, exactly as listed
    (NEWS, "news@example.test", True),
    (NEWS, "info@example.test", True),
    (NEWS, "INFO@example.test", True),
    (NEWS, "anyone@campaign.test", True),
    (NEWS, "info+x@example.test", False),
    (NEWS, "anyone@sub.campaign.test", False),
    (NEWS, "alice@example.test", False),
]


@pytest.mark.parametrize("user, text, allowed", SENDER_TABLE, ids=[f"{r[0]}-{r[1] or '<>'}" for r in SENDER_TABLE])
def test_sender_ownership(domains: LocalDomains, user: str, text: str, allowed: bool) -> None:
    sender, _ = parse_path(f"<{text}>", utf8=False, null_ok=True, kind="sender")
    reply = check_sender(user, sender, domains)
    if allowed:
        assert reply is None
    else:
        assert reply is not None and (reply.code, reply.status) == (553, "5.7.1"), reply


HEADER_TABLE = [
    # (From: addresses, allowed for alice)
    ([], True),
    (["alice@example.test"], True),
    (["Alice+x@EXAMPLE.test"], True),
    (["bob@remote.test"], True),  # not a local domain: not ours to police
    (["bob@example.test"], False),
    (["alice@example.test", "bob@example.test"], False),
    (["nobody@other.test"], False),
    (["bob@example.test."], False),  # the root's dot names the same local domain
    (["BOB@EXAMPLE.TEST."], False),
    (["alice@Example.Test."], True),
]


@pytest.mark.parametrize("addresses, allowed", HEADER_TABLE, ids=[",".join(r[0]) or "none" for r in HEADER_TABLE])
def test_header_sender_ownership(domains: LocalDomains, addresses: list[str], allowed: bool) -> None:
    reply = check_header_senders(A, addresses, domains)
    assert (reply is None) is allowed, reply
    if reply is not None:
        assert (reply.code, reply.status) == (553, "5.7.1")


OWNED = None
NOT_OWNED = (553, "5.7.1")
UNREADABLE = (550, "5.6.0")

ORIGINATOR_TABLE = [
    # (header section of a message from alice, the reply: None when it is accepted)
    (b"From: alice@example.test\nSubject: s\n\nbody", OWNED),
    (b"From : alice@example.test\n\n", OWNED),  # RFC 5322 4.5 obsolete syntax, but hers
    (b"From: Alice <alice@example.test.>\nSender: alice+x@EXAMPLE.test\n\n", OWNED),
    (b"From: alice@example.test\nReply-To: bob@example.test\n\n", OWNED),  # Reply-To claims nothing
    (b"From: Someone <someone@remote.test>\n\n", OWNED),  # not a local domain: not ours to police
    (b"From: undisclosed-recipients:;\n\n", OWNED),
    (b"Subject: no originator at all\n\n", OWNED),
    (b"From: alice@example.test\n\nFrom: bob@example.test\nnot a field\n", OWNED),  # the body is not looked at
    # Each way around the check the old (compat32) reading allowed:
    (b"Received : x\nFrom: bob@example.test\n\n", NOT_OWNED),
    (b"X-Caf\xc3\xa9: x\nFrom: bob@example.test\n\n", NOT_OWNED),
    (b"From : bob@example.test\n\n", NOT_OWNED),
    (b"From: bob@example.test.\n\n", NOT_OWNED),
    (b"From: alice@example.test\nSender: bob@example.test\n\n", NOT_OWNED),
    (b"From: alice@example.test\nResent-From: Bob <bob@example.test>\n\n", NOT_OWNED),
    (b"From: alice@example.test\nresent-sender : bob@Example.Test.\n\n", NOT_OWNED),
    (b"From: alice@example.test\nSender: nobody@other.test\n\n", NOT_OWNED),
    (b"From: bob@example.test <\n\n", NOT_OWNED),  # unreadable, but it names a local address
    # A header section that cannot be read unambiguously:
    (b"X-Caf\xc3\xa9: x\nFrom: alice@example.test\n\n", UNREADABLE),
    (b" continues nothing\nFrom: alice@example.test\n\n", UNREADABLE),
    (b"From: alice@example.test\nthis line is no field\n\nbody", UNREADABLE),
    (b"From: =?utf-8?q?bob=40example.test?=\n\n", UNREADABLE),  # shown as bob's address by readers
    (b"From: alice@example.test <bob@remote.test>\n\n", UNREADABLE),
    (b"From: alice@example.test\nSender: Alice\n\n", UNREADABLE),
]


@pytest.mark.parametrize("message, reply", ORIGINATOR_TABLE, ids=[repr(r[0][:40]) for r in ORIGINATOR_TABLE])
def test_every_originator_field_must_be_owned(domains: LocalDomains, message: bytes,
                                              reply: tuple[int, str] | None) -> None:
    refusal = check_originators(A, parse_header_section(message), domains)
    assert ((refusal.code, refusal.status) if refusal else None) == reply, refusal


def test_originator_refusals_name_the_field_and_the_problem(domains: LocalDomains) -> None:
    refusal = check_originators(A, parse_header_section(b"From: alice@example.test\nSender : bob@example.test.\n\n"),
                                domains)
    assert refusal is not None and refusal.text == "Sender: <bob@example.test> not owned by alice@example.test"
    refusal = check_originators(A, parse_header_section(b"Subject: s\nno field\n\n"), domains)
    assert refusal is not None and "line 2" in refusal.text and "header" in refusal.text.lower()


KEY_SENDERS = ("news@example.test", "@shop.example")
KEY_TABLE = [
    # (envelope sender, header section of a message POSTed with a key, the reply: None when accepted)
    ("news@example.test", b"From: News <news@example.test>\n\n", OWNED),
    ("NEWS@Example.TEST.", b"From: news@example.test\n\n", OWNED),
    ("x@shop.example", b"From: y@SHOP.example\nSender: news@example.test\n\n", OWNED),
    ("alice@example.test", b"From: news@example.test\n\n", NOT_OWNED),  # the envelope too
    ("", b"From: news@example.test\n\n", NOT_OWNED),  # no null sender for a key
    ("news@example.test", b"From: ceo@bank.test\n\n", NOT_OWNED),  # every domain, not only local ones
    ("news@example.test", b"From: news@example.test\nResent-From: x@sub.shop.example\n\n", NOT_OWNED),
    ("news@example.test", b"From: news@example.test\n bad first\nnot a field\n\n", UNREADABLE),
]


@pytest.mark.parametrize("sender, message, expected", KEY_TABLE)
def test_an_api_key_sends_only_as_its_senders(domains: LocalDomains, sender: str, message: bytes,
                                               expected: tuple[int, str] | None) -> None:
    reply = check_key_sender("api key crm", KEY_SENDERS, sender, parse_header_section(message), domains)
    assert (reply if reply is None else (reply.code, reply.status)) == expected, reply
