"""A programmable SMTP server for tests, run as a subprocess (asyncio, no Twisted).

    python -m tests.support.sink --listen 127.0.0.5:0 --record DIR [--tls-cert C --tls-key K]
        [--implicit-tls] [--auth USER:PASS] [--script SCRIPT.json] [--no-pipelining] [--no-esmtp]
        [--hostname NAME] [--size N] [--no-smtputf8] [--auth-mechanisms "PLAIN LOGIN"]
        [--inject-after-starttls TEXT]

Prints "ready PORT" once listening; exits on SIGTERM. Each accepted message is
DIR/NNNNNN.json (written to a temp name, then renamed); every command line is a
JSON line in DIR/commands.log with its connection number, the number of the
network read it arrived in ("batch": lines of one pipelined write share it) and
whether the session was encrypted.

A script is a JSON list of rules, tried in order, the first match wins:
    {"when": "RCPT", "match": "bob@", "reply": "450 4.2.1 mailbox busy", "times": 1}
    {"when": "CONNECT", "reply": "421 4.7.0 go away", "every": 5}
`when` is CONNECT (the greeting), EHLO, HELO, STARTTLS, AUTH, MAIL, RCPT, DATA,
DATA_END (the reply after the final dot), RSET, NOOP or QUIT; `match` is a
case-insensitive substring of the argument (of the message for DATA_END);
`times` limits a rule to its first N matches; `every` makes it apply to every
Nth match only; `"close": true` closes the connection after the reply (a 421
always does); `"reply": null` sends nothing at all. A DATA rule whose reply is
354 accepts DATA even without recipients (RFC 2920 3.1's case).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINE_MAX = 64 * 1024  # generous: the sink records what clients send, it does not police lines


@dataclass
class Rule:
    when: str
    reply: str | None  # None: say nothing (a server that hangs)
    match: str = ""
    times: int | None = None
    every: int | None = None
    close: bool = False
    seen: int = 0  # matches so far (the sink is one process: counted across connections)
    used: int = 0

    def applies(self, when: str, argument: str) -> bool:
        if when != self.when or self.match.lower() not in argument.lower():
            return False
        self.seen += 1
        if self.every and self.seen % self.every:
            return False
        if self.times is not None and self.used >= self.times:
            return False
        self.used += 1
        return True


@dataclass
class Settings:
    record: Path
    hostname: str
    tls: ssl.SSLContext | None
    implicit_tls: bool
    auth: tuple[str, str] | None
    rules: list[Rule]
    pipelining: bool
    esmtp: bool
    size: int
    inject: bytes
    smtputf8: bool
    mechanisms: list[str]
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    connections: itertools.count = field(default_factory=lambda: itertools.count(1))


class SinkSession(asyncio.Protocol):
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.connection = next(settings.connections)
        self.transport: Any = None
        self.buffer = bytearray()
        self.batch = 0
        self.tls = settings.implicit_tls
        self.helo: str | None = None
        self.esmtp = False
        self.user: str | None = None
        self.refusing = False  # after a non-2xx greeting: nothing but QUIT works
        self.auth_state: str | None = None  # "plain", "login-user", "login-pass" while AUTH talks
        self.login_user = ""
        self.reset()
        self.data: list[bytes] | None = None
        self.previous_crlf = True
        self.upgrading = False

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params = ""
        self.rcpt_to: list[str] = []

    # --- connection ----------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        rule = self.rule("CONNECT", "")
        if rule is None:
            self.send(f"220 {self.s.hostname} ESMTP sink")
            return
        self.reply_for(rule)
        if not (rule.reply or "").startswith("2"):
            self.refusing = True

    def send(self, text: str, extra: bytes = b"") -> None:
        """A reply: "CODE text" on the first line; more lines of text make it multi-line."""
        first, *more = text.split("\n")
        code, lines = first[:3], [first[4:], *more]
        out = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
        self.transport.write(("\r\n".join(out) + "\r\n").encode("utf-8") + extra)

    def rule(self, when: str, argument: str) -> Rule | None:
        return next((rule for rule in self.s.rules if rule.applies(when, argument)), None)

    def scripted(self, when: str, argument: str) -> Rule | None:
        """Send a scripted reply if a rule matches; the rule (None: behave normally)."""
        rule = self.rule(when, argument)
        if rule is not None:
            self.reply_for(rule)
        return rule

    def reply_for(self, rule: Rule) -> None:
        if rule.reply is not None:
            self.send(rule.reply)
        if rule.close or (rule.reply or "").startswith("421"):
            self.transport.close()

    # --- input ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.batch += 1
        self.buffer += data
        if self.upgrading:
            return  # decrypted input can come before start_tls returns our new transport
        self.process()

    def process(self) -> None:
        while not self.transport.is_closing():
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > LINE_MAX:
                    self.send("500 5.5.6 Line too long")
                    self.transport.close()
                return
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            if self.data is not None:
                self.data_line(line)
            elif self.command_line(line):
                return  # STARTTLS: the rest is plaintext from before the handshake

    def data_line(self, line: bytes) -> None:
        assert self.data is not None
        if line == b".\r\n" and self.previous_crlf:
            message, self.data = b"".join(self.data), None
            self.end_of_data(message)
            return
        self.previous_crlf = line.endswith(b"\r\n")
        self.data.append(line[1:] if line.startswith(b".") else line)

    def command_line(self, raw: bytes) -> bool:
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        self.log(line)
        if self.auth_state is not None:
            self.auth_response(line)
            return False
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if self.refusing and verb != "QUIT":
            self.send("503 5.5.1 No service")
            return False
        handler = getattr(self, f"smtp_{verb}", None)
        if handler is None:
            self.send("500 5.5.1 Unknown command")
            return False
        return bool(handler(argument))

    def log(self, line: str) -> None:
        entry = {"conn": self.connection, "batch": self.batch, "tls": self.tls, "line": line}
        with open(self.s.record / "commands.log", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    # --- commands ------------------------------------------------------------

    def smtp_EHLO(self, argument: str) -> None:
        if self.scripted("EHLO", argument):
            return
        if not self.s.esmtp:
            self.send("502 5.5.1 EHLO not implemented")
            return
        self.helo, self.esmtp = argument, True
        self.reset()
        lines = [f"250 {self.s.hostname} hello {argument}"]
        if self.s.pipelining:
            lines.append("PIPELINING")
        lines += [f"SIZE {self.s.size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.s.smtputf8:
            lines.append("SMTPUTF8")
        if self.s.tls is not None and not self.tls:
            lines.append("STARTTLS")
        if self.s.auth is not None:
            lines.append("AUTH " + " ".join(self.s.mechanisms))
        self.send("\n".join(lines))

    def smtp_HELO(self, argument: str) -> None:
        if self.scripted("HELO", argument):
            return
        self.helo, self.esmtp = argument, False
        self.reset()
        self.send(f"250 {self.s.hostname}")

    def smtp_STARTTLS(self, argument: str) -> bool:
        if self.s.tls is None or self.tls:
            self.send("502 5.5.1 STARTTLS not available")
            return False
        if self.scripted("STARTTLS", argument):
            return False
        self.send("220 2.0.0 Ready to start TLS", self.s.inject)
        self.buffer.clear()
        # Nothing may be read in plaintext between the 220 and the handshake.
        self.transport.pause_reading()
        self.upgrading = True
        asyncio.ensure_future(self.upgrade())
        return True

    async def upgrade(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.s.tls, server_side=True)
        except (ssl.SSLError, OSError, ConnectionError):
            self.transport.close()
            return
        self.tls, self.upgrading = True, False
        self.helo, self.esmtp, self.user = None, False, None
        self.reset()
        self.process()

    def smtp_AUTH(self, argument: str) -> None:
        if self.scripted("AUTH", argument):
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if self.s.auth is None or mechanism not in self.s.mechanisms:
            self.send("504 5.5.4 Unrecognized authentication type")
        elif mechanism == "PLAIN" and initial:
            self.auth_plain(initial)
        elif mechanism == "PLAIN":
            self.auth_state = "plain"
            self.send("334 ")
        else:
            self.auth_state = "login-user"
            self.send("334 VXNlcm5hbWU6")

    def auth_response(self, line: str) -> None:
        state, self.auth_state = self.auth_state, None
        if line == "*":
            self.send("501 5.7.0 Authentication cancelled")
        elif state == "plain":
            self.auth_plain(line)
        elif state == "login-user":
            self.login_user = decode64(line)
            self.auth_state = "login-pass"
            self.send("334 UGFzc3dvcmQ6")
        else:
            self.check_credentials(self.login_user, decode64(line))

    def auth_plain(self, token: str) -> None:
        parts = decode64(token).split("\0")
        if len(parts) != 3:
            self.send("501 5.5.2 Malformed AUTH PLAIN")
            return
        self.check_credentials(parts[1], parts[2])

    def check_credentials(self, user: str, password: str) -> None:
        if (user, password) == self.s.auth:
            self.user = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Authentication credentials invalid")

    def smtp_MAIL(self, argument: str) -> None:
        if self.helo is None:
            self.send("503 5.5.1 Send EHLO first")
            return
        if self.mail_from is not None:
            self.send("503 5.5.1 Nested MAIL")
            return
        if self.scripted("MAIL", argument):
            return
        path, _, params = argument[5:].strip().partition(">")
        params = params.strip()
        if params and not self.esmtp:
            self.send("555 5.5.4 MAIL parameters need EHLO")
            return
        for param in params.split():
            key, _, value = param.partition("=")
            if key.upper() == "SIZE" and value.isdigit() and int(value) > self.s.size:
                self.send("552 5.3.4 Message too big")
                return
        self.mail_from, self.mail_params = path.lstrip("<"), params
        self.send("250 2.1.0 Ok")

    def smtp_RCPT(self, argument: str) -> None:
        if self.mail_from is None:
            self.send("503 5.5.1 Need MAIL first")
            return
        if self.scripted("RCPT", argument):
            return
        self.rcpt_to.append(argument[3:].strip().strip("<>"))
        self.send("250 2.1.5 Ok")

    def smtp_DATA(self, argument: str) -> None:
        if self.mail_from is None:
            self.send("503 5.5.1 Need MAIL first")
            return
        rule = self.rule("DATA", argument)
        if rule is not None and (rule.reply or "").startswith("354"):
            self.data, self.previous_crlf = [], True
            self.send(rule.reply)  # even without recipients: a careless server
            return
        if not self.rcpt_to:
            self.send("554 5.5.1 No valid recipients")
            return
        if rule is not None:
            self.reply_for(rule)
            return
        self.data, self.previous_crlf = [], True
        self.send("354 End data with <CR><LF>.<CR><LF>")

    def end_of_data(self, message: bytes) -> None:
        rule = self.rule("DATA_END", message.decode("latin-1"))
        if rule is not None:
            self.reply_for(rule)
        elif not self.rcpt_to:
            self.send("554 5.5.1 No valid recipients")
        else:
            self.record(message)
            self.send("250 2.0.0 Ok: queued")
        self.reset()

    def record(self, message: bytes) -> None:
        entry = {
            "mail_from": self.mail_from, "rcpt_to": self.rcpt_to, "data": message.decode("latin-1"),
            "tls": self.tls, "auth": self.user, "helo": self.helo, "mail_params": self.mail_params,
            "conn": self.connection, "end_batch": self.batch,  # the network read the final dot came in
        }
        name = f"{next(self.s.counter):06d}.json"
        temp = self.s.record / f".{name}.tmp"
        temp.write_text(json.dumps(entry))
        os.replace(temp, self.s.record / name)

    def smtp_RSET(self, argument: str) -> None:
        if not self.scripted("RSET", argument):
            self.reset()
            self.send("250 2.0.0 Ok")

    def smtp_NOOP(self, argument: str) -> None:
        if not self.scripted("NOOP", argument):
            self.send("250 2.0.0 Ok")

    def smtp_QUIT(self, argument: str) -> None:
        if not self.scripted("QUIT", argument):
            self.send("221 2.0.0 Bye")
        self.transport.close()


def decode64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except ValueError:
        return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.sink", description="Programmable SMTP sink for tests")
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT (port 0 picks a free one)")
    parser.add_argument("--record", required=True, type=Path)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--auth", help="USER:PASS")
    parser.add_argument("--script", type=Path)
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--no-esmtp", action="store_true")
    parser.add_argument("--hostname", default="sink.test")
    parser.add_argument("--size", type=int, default=10240000)
    parser.add_argument("--no-smtputf8", action="store_true")
    parser.add_argument("--auth-mechanisms", default="PLAIN LOGIN")
    parser.add_argument("--inject-after-starttls", default="", help="bytes sent right after the 220 to STARTTLS")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    rules = [Rule(**rule) for rule in json.loads(args.script.read_text())] if args.script else []
    user, _, password = (args.auth or "").partition(":")
    args.record.mkdir(parents=True, exist_ok=True)
    return Settings(
        record=args.record, hostname=args.hostname, tls=context, implicit_tls=args.implicit_tls,
        auth=(user, password) if args.auth else None, rules=rules, pipelining=not args.no_pipelining,
        esmtp=not args.no_esmtp, size=args.size, smtputf8=not args.no_smtputf8,
        mechanisms=args.auth_mechanisms.upper().split(),
        inject=args.inject_after_starttls.encode("latin-1").decode("unicode_escape").encode("latin-1"),
    )


async def serve(args: argparse.Namespace) -> None:
    settings = build_settings(args)
    host, _, port = args.listen.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkSession(settings), host.strip("[]"), int(port),
        ssl=settings.tls if args.implicit_tls else None,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
