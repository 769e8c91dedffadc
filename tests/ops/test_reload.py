"""SIGHUP (mailhost.ops.reload with service.reloader): every component whose settings changed
is rebuilt, what needs a restart is named, and a configuration that cannot be applied changes
nothing. One test per section."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mailhost.authn.dkim import generate
from mailhost.config import load
from mailhost.intake.origin import SMTP, Origin
from mailhost.local.users import UserEntry, write_users
from mailhost.multiproc.shard import EVERYTHING
from mailhost.ops.metrics import Metrics
from mailhost.ops.tls import ServerTLS, ensure_tls_pair
from mailhost.service import Inbound, Outbound, build_inbound, build_outbound, reloader
from mailhost.smtp.wire import Address

BASE = """
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
"""


class Running:
    """The components of one process, built as the daemon builds them, and its SIGHUP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "mailhost.toml"
        self.path.write_text(BASE)
        write_users(root / "users", {a: UserEntry(a, "x") for a in ("alice@example.test", "alice@new.test")})
        config = load(self.path)
        config.server.state_dir.mkdir(parents=True, exist_ok=True)
        self.tls = ServerTLS(*ensure_tls_pair(config))
        clock = Clock()
        parent = service.MultiService()
        self.inbound: Inbound = build_inbound(config, self.tls, clock, parent, Metrics(), EVERYTHING)
        self.outbound: Outbound = build_outbound(config, self.inbound, clock, parent, Metrics(), main=True)
        self.reload = reloader(self.tls, clock, self.inbound, self.outbound)

    def hangup(self, text: str) -> None:
        self.path.write_text(BASE + text)
        self.reload.reload()

    @property
    def intake(self) -> Any:
        return self.inbound.intake


@pytest.fixture
def running(tmp_path: Path) -> Running:
    return Running(tmp_path)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def outside_rcpt(running: Running, address: str) -> int:
    origin = Origin(SMTP, role="mx", client_ip="192.0.2.1", helo="x")
    local, _, domain = address.rpartition("@")
    return running.intake.recipient_verdict(Address(local, domain), origin).reply.code


SECTIONS: list[tuple[str, str, Callable[[Running], object], object, object]] = [
    ("inbound", '[inbound]\ndmarc_reject = true\n', lambda r: r.intake.settings.dmarc_reject, False, True),
    ("submission", '[submission]\nhide_client = true\n', lambda r: r.intake.settings.hide_client, False, True),
    ("bounces", '[bounces]\nsoft_limit = 7\nconsume = false\n',
     lambda r: (r.inbound.suppression.soft_limit, r.intake.settings.consume_bounces), (3, True), (7, False)),
    ("limits", '[limits]\nrecipients = 7\n', lambda r: r.inbound.context.config.limits.recipients, 100, 7),
    ("relay", '[relay]\nverp = true\nmx_port = 2626\n',
     lambda r: (r.intake.settings.verp, r.outbound.deliverer.config.relay.mx_port), (False, 25), (True, 2626)),
    ("queue", '[queue]\nretry = ["7m"]\nconcurrency = 9\n',
     lambda r: (r.outbound.scheduler.config.queue.retry, r.outbound.scheduler.max_in_flight), ((60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0), 100), ((420.0,), 9)),
    ("throttles", '[[throttle]]\nname = "big"\nmx = ["big.test"]\nconnections = 3\nrate = 60\n',
     lambda r: r.outbound.throttle.pace_for("mx1.big.test").name, "big.test", "big"),
    ("domains", '[[domain]]\nname = "new.test"\nmaildir = "mail/new.test"\nusers = "users"\ncatch_all = "alice"\n',
     lambda r: (r.inbound.domains.is_local("new.test"), outside_rcpt(r, "alice@new.test")), (False, 554), (True, 250)),
]


@pytest.mark.parametrize("name, text, read, before, after", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_each_section_takes_effect_on_sighup(running: Running, logged: list[str], name: str, text: str,
                                             read: Callable[[Running], object], before: object, after: object) -> None:
    assert read(running) == before
    running.hangup(text)
    assert read(running) == after
    assert any(line.startswith("reloaded ") and name in line for line in logged), logged


def test_dkim_keys_named_in_the_config_are_taken(running: Running, logged: list[str]) -> None:
    path, _ = generate(running.root / "keys", "example.test", "s7")
    assert running.intake.signer.key_for("example.test") is None
    running.hangup(f'[[dkim]]\ndomain = "example.test"\nselector = "s7"\nkey_file = "{path}"\n')
    assert running.intake.signer.key_for("example.test").selector == "s7"
    assert any("changed" in line and "dkim" in line for line in logged)


def test_users_files_are_read_again(running: Running) -> None:
    assert running.inbound.domains.user("bob@example.test") is None
    write_users(running.root / "users", {a: UserEntry(a, "x") for a in ("alice@example.test", "bob@example.test")})
    running.reload.reload()
    assert running.inbound.domains.user("bob@example.test") is not None


def test_listeners_wait_for_a_restart_and_are_named(running: Running, logged: list[str]) -> None:
    running.path.write_text(BASE.replace("tcp:2525", "tcp:2526"))
    running.reload.reload()
    assert any("listeners changed; those take effect at the next restart" in line for line in logged), logged


def test_a_configuration_with_an_unusable_key_changes_nothing(running: Running, logged: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (running.root / "ec.pem").write_bytes(key)
    running.hangup('[inbound]\ndmarc_reject = true\n[[dkim]]\ndomain = "example.test"\nselector = "s1"\n'
                   'key_file = "ec.pem"\n')
    assert running.intake.settings.dmarc_reject is False  # not half-applied
    assert any("ec.pem" in line and "keeping the running configuration" in line for line in logged), logged


def test_a_typo_is_logged_and_the_running_configuration_kept(running: Running, logged: list[str]) -> None:
    running.hangup('[inbound]\ndmarc_rejcet = true\n')
    assert running.intake.settings.dmarc_reject is False
    assert any("dmarc_rejcet" in line and "keeping the running configuration" in line for line in logged), logged


def test_relay_routes_change_without_losing_the_dns_threads(running: Running, logged: list[str]) -> None:
    smarthost = '[relay]\n[[relay.smarthost]]\nhost = "127.0.0.9"\nport = {port}\ntls = "none"\n'
    running.hangup(smarthost.format(port=2525))
    router = running.outbound.deliverer.router
    assert [(hop.host, hop.port) for hop in router.resolve("remote.test").hops] == [("127.0.0.9", 2525)]
    running.hangup(smarthost.format(port=2626))
    assert running.outbound.deliverer.router is router
    assert [(hop.host, hop.port) for hop in router.resolve("remote.test").hops] == [("127.0.0.9", 2626)]
    assert any(line.startswith("reloaded ") and "relay" in line for line in logged), logged


def test_webhooks_follow_sighup_and_secrets_are_read_again(tmp_path: Path) -> None:
    from twisted.internet.defer import succeed

    from mailhost.feedback.webhooks import Sender, WebhookService

    running = Running(tmp_path)
    clock = Clock()
    events = running.inbound.suppression.events
    started: list[str] = []

    def sender(hook: Any) -> Sender:
        started.append(hook.config.url)
        return Sender(hook, events, running.inbound.writer.run, clock, post=lambda *_: succeed((200, b"")))

    hooks = WebhookService(events, [], running.inbound.writer.run, clock, make_sender=sender)
    hooks.startService()
    running.reload = reloader(running.tls, clock, running.inbound, running.outbound, hooks)
    (tmp_path / "hook.secret").write_text("s1")
    text = '[[webhook]]\nurl = "https://crm.example.org/hook"\nsecret_file = "hook.secret"\n'
    running.hangup(text)
    assert started == ["https://crm.example.org/hook"] and len(hooks.senders) == 1
    [sender_now] = hooks.senders.values()
    assert sender_now.hook.secret == b"s1"
    (tmp_path / "hook.secret").write_text("s2")
    running.hangup(text)  # the same section: the secret file is read again, the sender kept
    assert hooks.senders[sender_now.hook.key] is sender_now and sender_now.hook.secret == b"s2"
    running.hangup("")
    assert hooks.senders == {}
    hooks.stopService()
