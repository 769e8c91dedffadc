"""The SMTP server protocol (RFC 5321 with ESMTP extensions) and its factory.

One session reads whole network buffers: command lines are split with
bytes.find, DATA is handed to wire.MessageReader in the buffers it arrived in.
Commands run strictly in order; when one has to wait (the disk, before the
250 after DATA), the rest of the buffer waits behind it, so pipelined replies
always come back in order.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from mailhost.config import Config
from mailhost.dsn import received_count
from mailhost.envelope import Envelope, Recipient
from mailhost.intake import HOP_LIMIT, Intake, delivery_headers
from mailhost.mailbox import Copy, LocalDomains
from mailhost.policy import check_recipient
from mailhost.spool import new_queue_id
from mailhost.smtp.wire import (
    COMMAND_LINE_MAX,
    Address,
    MessageReader,
    Reply,
    SMTPError,
    check_body,
    parse_parameters,
    parse_path,
    split_command,
    unstuff_to_lf,
)

log = Logger(namespace="mailhost.smtp")

ERROR_LIMIT = 10
# Verbs an HTTP client or a browser's cross-protocol request would send.
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "HOST:", "USER-AGENT:"})
# Replies that mean "the client spoke the protocol wrong"; ERROR_LIMIT of them end the session.
PROTOCOL_ERRORS = frozenset({500, 501, 502, 503, 504, 555})
# While a reply waits on the disk, stop reading once this much input is buffered.
PAUSE_BUFFER = 256 * 1024

OK = Reply(250, "2.0.0", "Ok")


@dataclass
class ServerContext:
    """What every session of the daemon shares."""

    config: Config
    domains: LocalDomains
    intake: Intake
    tls_options: Any | None  # twisted IOpenSSLContextFactory, None when TLS is off


@dataclass
class Transaction:
    sender: Address
    utf8: bool
    body_8bit: bool
    recipients: list[tuple[Address, Any]] = field(default_factory=list)


class SMTPServerFactory(Factory):
    """Builds sessions for one listener and counts connections per client address."""

    def __init__(self, role: str, context: ServerContext, reactor: Any) -> None:
        self.role = role
        self.context = context
        self.reactor = reactor
        self.per_ip: Counter[str] = Counter()
        self.noisy = False

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self)


class SMTPServer(Protocol, TimeoutMixin):
    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.context = factory.context
        self.config = factory.context.config
        self.reactor = factory.reactor
        self._buffer = bytearray()
        self._reader: MessageReader | None = None
        self._busy = False
        self._paused = False
        self._greeted = False
        self._closing = False
        self._skipping_long_line = False
        self._pending_greeting: Any = None
        self._out: list[bytes] = []
        self.errors = 0
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.transaction: Transaction | None = None
        self.client_ip = ""
        self.may_relay = False

    # --- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        # Replies are whole and flushed deliberately; Nagle would only delay them.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "") or "unknown"
        try:
            ip = ipaddress.ip_address(self.client_ip)
            if getattr(ip, "ipv4_mapped", None):
                ip = ip.ipv4_mapped
            self.may_relay = any(ip in network for network in self.config.relay.networks)
        except ValueError:
            self.may_relay = False
        self.factory.per_ip[self.client_ip] += 1
        limits = self.config.limits
        if self.factory.per_ip[self.client_ip] > limits.connections_per_ip:
            self._refuse_connection(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many connections from your address"))
            return
        self.setTimeout(limits.command_timeout)
        if self.factory.role == "mx" and limits.greet_pause > 0 and not self.may_relay:
            self._pending_greeting = self.reactor.callLater(limits.greet_pause, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._pending_greeting = None
        self._greeted = True
        self.transport.write(Reply(220, "", f"{self.config.server.hostname} ESMTP mailhost").encode())

    def _refuse_connection(self, reply: Reply) -> None:
        log.info("refused client=[{client}] reply={reply}", client=self.client_ip, reply=f"{reply.code} {reply.status} {reply.text}")
        self._closing = True
        self.transport.write(reply.encode())
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        if self._pending_greeting is not None and self._pending_greeting.active():
            self._pending_greeting.cancel()
        self.factory.per_ip[self.client_ip] -= 1
        if self.factory.per_ip[self.client_ip] <= 0:
            del self.factory.per_ip[self.client_ip]

    def timeoutConnection(self) -> None:
        self._refuse_connection(Reply(421, "4.4.2", f"{self.config.server.hostname} Timeout, closing connection"))

    # --- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._greeted:
            self._refuse_connection(Reply(554, "5.5.1", "Protocol error: you talked before my greeting"))
            return
        self.resetTimeout()
        if self._reader is not None and not self._busy and not self._buffer:
            # The common case in DATA: hand the buffer over without copying it.
            used = self._reader.feed(data)
            if self._reader.body is None:
                return
            self._buffer += data[used:]
            self._end_of_data()
        else:
            self._buffer += data
        self._process()
        if self._busy and not self._paused and len(self._buffer) > PAUSE_BUFFER:
            self._paused = True
            self.transport.pauseProducing()

    def _process(self) -> None:
        """Run whatever complete input is buffered, until it is used up or a reply must wait."""
        while self._buffer and not self._busy and not self._closing:
            if self._reader is not None:
                data = bytes(self._buffer)
                self._buffer.clear()
                used = self._reader.feed(data)
                if self._reader.body is None:
                    break
                self._buffer += data[used:]
                self._end_of_data()
                continue
            if not self._run_command_lines():
                break
        self._flush()

    def _run_command_lines(self) -> bool:
        """Run buffered command lines; False when more input is needed."""
        buffer = self._buffer
        position = 0
        try:
            while not self._busy and not self._closing and self._reader is None:
                end = buffer.find(b"\n", position)
                if end < 0:
                    if len(buffer) - position > COMMAND_LINE_MAX:
                        # Drop the overlong line as it arrives; answer at its end.
                        self._skipping_long_line = True
                        position = len(buffer)
                    return False
                line = bytes(buffer[position:end])
                position = end + 1
                if self._skipping_long_line or len(line) + 1 > COMMAND_LINE_MAX:
                    self._skipping_long_line = False
                    self._reply(Reply(500, "5.5.6", f"Line too long (at most {COMMAND_LINE_MAX} octets)"))
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._command(line)
                if self._starting_tls:
                    # RFC 3207 4.2: nothing the client sent behind STARTTLS is kept.
                    position = len(buffer)
                    self._start_tls()
            return True
        finally:
            del buffer[:position]

    _starting_tls = False

    def _flush(self) -> None:
        if self._out:
            self.transport.write(b"".join(self._out))
            self._out.clear()

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.encode())
        if reply.code in PROTOCOL_ERRORS:
            self.errors += 1
            if self.errors >= ERROR_LIMIT:
                self._out.append(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many errors, closing connection").encode())
                self._close()

    def _close(self) -> None:
        self._closing = True
        self._flush()
        self.transport.loseConnection()

    def _wait_for(self, deferred: Deferred[Reply]) -> None:
        """A reply that is not ready yet: hold all later input until it is."""
        self._busy = True
        self._flush()
        deferred.addCallback(self._resume)

    def _resume(self, reply: Reply) -> None:
        self._busy = False
        if self._closing:
            return
        self._reply(reply)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    # --- commands ------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        allow_utf8 = verb in (b"MAIL", b"RCPT")
        try:
            verb_text, argument = split_command(line, allow_utf8)
        except SMTPError as e:
            log.info("refused client=[{client}] reply={reply}", client=self.client_ip, reply=str(e))
            self._reply(e.reply)
            return
        if verb_text in HTTP_VERBS:
            log.info("refused client=[{client}] http request {verb}", client=self.client_ip, verb=verb_text)
            self._reply(Reply(554, "5.7.0", "This is an SMTP server; HTTP is not spoken here"))
            self._close()
            return
        handler: Callable[[str], Reply | Deferred[Reply] | None] | None = getattr(self, f"smtp_{verb_text}", None)
        if handler is None or not verb_text.isalpha():
            self._reply(Reply(500, "5.5.1", "Unknown command"))
            return
        try:
            result = handler(argument)
        except SMTPError as e:
            result = e.reply
        except Exception:
            # A bug or an unreadable users file must not cost the session: say "try later".
            log.failure("{verb} from [{client}] failed", verb=verb_text, client=self.client_ip)
            result = Reply(451, "4.3.0", "Local error in processing; try again later")
        if isinstance(result, Deferred):
            self._wait_for(result)
        elif result is not None:
            self._reply(result)

    def smtp_EHLO(self, argument: str) -> Reply:
        return self._hello(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> Reply:
        return self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> Reply:
        if not argument or " " in argument:
            return Reply(501, "5.5.4", "Syntax: EHLO hostname")
        self.helo = argument
        self.esmtp = esmtp
        self.transaction = None
        hostname = self.config.server.hostname
        if not esmtp:
            return Reply(250, "", hostname)
        lines = [
            f"{hostname} Hello {argument} [{self.client_ip}]",
            "PIPELINING",
            f"SIZE {self.config.limits.message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.context.tls_options is not None and not self.tls:
            lines.append("STARTTLS")
        lines.append("HELP")
        return Reply(250, "", "\n".join(lines))

    def smtp_MAIL(self, argument: str) -> Reply:
        if self.helo is None:
            return Reply(503, "5.5.1", "Error: send EHLO or HELO first")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "Error: nested MAIL command")
        if argument[:5].upper() != "FROM:":
            return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        path = argument[5:].lstrip(" ")
        # Parameters come after the path; SMTPUTF8 decides how the path may look.
        params_text = path.rsplit(">", 1)[-1] if ">" in path else ""
        params = parse_parameters(params_text)
        utf8 = "SMTPUTF8" in params
        sender, rest = parse_path(path, utf8=utf8 and self.esmtp, null_ok=True, kind="sender")
        params = parse_parameters(rest)
        body_8bit = False
        for key, value in params.items():
            if not self.esmtp:
                return Reply(555, "5.5.4", "MAIL parameters need EHLO")
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return Reply(501, "5.5.4", "Syntax: SIZE=<number>")
                if int(value) > self.config.limits.message_size:
                    log.info("refused client=[{client}] from=<{sender}> size={size} reply=552 5.3.4", client=self.client_ip, sender=str(sender), size=value)
                    return Reply(552, "5.3.4", f"Message size exceeds fixed limit of {self.config.limits.message_size} octets")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(555, "5.5.4", "Unsupported BODY value (7BIT or 8BITMIME)")
                body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(555, "5.5.4", "SMTPUTF8 takes no value")
            else:
                return Reply(555, "5.5.4", f"Unsupported MAIL parameter {key}")
        self.transaction = Transaction(sender, utf8, body_8bit)
        return Reply(250, "2.1.0", "Sender ok")

    def smtp_RCPT(self, argument: str) -> Reply:
        if self.transaction is None:
            return Reply(503, "5.5.1", "Error: need MAIL command first")
        if argument[:3].upper() != "TO:":
            return Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path = argument[3:].lstrip(" ")
        if path[:12].lower() == "<postmaster>" and path[12:].strip(" ") == "":
            # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
            recipient, rest = Address("postmaster", self.context.domains.primary), ""
        else:
            recipient, rest = parse_path(path, utf8=self.transaction.utf8, null_ok=False, kind="recipient")
        if rest:
            return Reply(555, "5.5.4", f"Unsupported RCPT parameter {rest.split('=')[0][:40]}")
        if len(self.transaction.recipients) >= self.config.limits.recipients:
            return Reply(452, "4.5.3", "Too many recipients")
        verdict = check_recipient(recipient, self.context.domains, self.may_relay)
        if not verdict.accepted:
            log.info(
                "refused client=[{client}] from=<{sender}> to=<{rcpt}> reply={reply}",
                client=self.client_ip, sender=str(self.transaction.sender), rcpt=str(recipient),
                reply=f"{verdict.reply.code} {verdict.reply.status} {verdict.reply.text}",
            )
            return verdict.reply
        self.transaction.recipients.append((recipient, verdict.resolution))
        return verdict.reply

    def smtp_DATA(self, argument: str) -> Reply:
        if argument:
            return Reply(501, "5.5.4", "Syntax: DATA (no argument)")
        if self.transaction is None:
            return Reply(503, "5.5.1", "Error: need MAIL command first")
        if not self.transaction.recipients:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        self._reader = MessageReader(self.config.limits.message_size)
        self.setTimeout(self.config.limits.data_timeout)
        return Reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def smtp_RSET(self, argument: str) -> Reply:
        self.transaction = None
        return Reply(250, "2.0.0", "Ok")

    def smtp_NOOP(self, argument: str) -> Reply:
        return OK

    def smtp_QUIT(self, argument: str) -> None:
        self._reply(Reply(221, "2.0.0", "Bye"))
        self._close()

    def smtp_VRFY(self, argument: str) -> Reply:
        if not argument:
            return Reply(501, "5.5.4", "Syntax: VRFY address")
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, argument: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN is not available")

    def smtp_HELP(self, argument: str) -> Reply:
        return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")

    def smtp_STARTTLS(self, argument: str) -> Reply:
        if self.context.tls_options is None:
            return Reply(502, "5.5.1", "STARTTLS is not available")
        if self.tls:
            return Reply(503, "5.5.1", "Error: TLS already active")
        if argument:
            return Reply(501, "5.5.4", "Syntax: STARTTLS (no argument)")
        self._starting_tls = True
        return Reply(220, "2.0.0", "Ready to start TLS")

    def _start_tls(self) -> None:
        self._starting_tls = False
        self._flush()
        self.transport.startTLS(self.context.tls_options)
        self.tls = True
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None
        self.esmtp = False
        self.transaction = None

    # --- end of DATA ---------------------------------------------------------

    def _end_of_data(self) -> None:
        reader, self._reader = self._reader, None
        transaction, self.transaction = self.transaction, None
        self.setTimeout(self.config.limits.command_timeout)
        assert reader is not None and reader.body is not None and transaction is not None
        if reader.oversized:
            self._refuse_message(transaction, reader.size, Reply(552, "5.3.4", f"Message size exceeds fixed limit of {self.config.limits.message_size} octets"))
            return
        problem = check_body(reader.body) or _loop_check(reader.body)
        if problem is not None:
            self._refuse_message(transaction, reader.size, problem)
            return
        self._wait_for(self._accept(transaction, unstuff_to_lf(reader.body), reader.size))

    def _refuse_message(self, transaction: Transaction, size: int, reply: Reply) -> None:
        log.info(
            "refused client=[{client}] from=<{sender}> size={size} reply={reply}",
            client=self.client_ip, sender=str(transaction.sender), size=size, reply=f"{reply.code} {reply.status} {reply.text}",
        )
        self._reply(reply)

    def _accept(self, transaction: Transaction, body: bytes, size: int) -> Deferred[Reply]:
        queue_id = new_queue_id()
        now = formatdate(localtime=True)
        copies: list[Copy] = []
        remote: list[str] = []
        seen: set[str] = set()
        for recipient, resolution in transaction.recipients:
            for mailbox in resolution.mailboxes:
                if mailbox.address not in seen:
                    seen.add(mailbox.address)
                    received = self._received(transaction, queue_id, str(recipient), now)
                    copies.append(Copy(mailbox, delivery_headers(str(transaction.sender), mailbox.address) + received))
            remote.extend(r for r in resolution.remote if r not in remote)
        envelope = None
        if remote:
            envelope = Envelope(
                id=queue_id, sender=str(transaction.sender), recipients=[Recipient(r) for r in remote],
                arrival=time.time(), next_attempt=time.time(), client=f"{self.helo} ([{self.client_ip}])",
                body_8bit=transaction.body_8bit, smtputf8=transaction.utf8,
            )
        only = remote[0] if len(remote) == 1 else None
        deferred = self.context.intake.accept(copies, envelope, self._received(transaction, queue_id, only, now), body)

        def accepted(_: object) -> Reply:
            log.info(
                "{id}: accepted client=[{client}] helo={helo} tls={tls} from=<{sender}> to={rcpts} size={size}"
                " local={local} queued={queued}",
                id=queue_id, client=self.client_ip, helo=self.helo, tls=self._tls_version() or "no",
                sender=str(transaction.sender), rcpts=",".join(f"<{r}>" for r, _ in transaction.recipients), size=size,
                local=len(copies), queued=len(remote),
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Any) -> Reply:
            log.error(
                "{id}: not accepted client=[{client}] from=<{sender}> error={error} reply=451 4.3.0",
                id=queue_id, client=self.client_ip, sender=str(transaction.sender), error=failure.getErrorMessage(),
            )
            return Reply(451, "4.3.0", "Local error in processing; try again later")

        return deferred.addCallbacks(accepted, failed)

    def _received(self, transaction: Transaction, queue_id: str, recipient: str | None, date: str) -> bytes:
        """Our RFC 5321 4.4 trace header; `for` only when it names one recipient."""
        protocol = ("UTF8SMTP" if transaction.utf8 else "ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else "")
        literal = f"IPv6:{self.client_ip}" if ":" in self.client_ip else self.client_ip
        tls = self._tls_version()
        tls_comment = f"\n\t(using {tls})" if tls else ""
        for_clause = f"\n\tfor <{recipient}>" if recipient else ""
        return (
            f"Received: from {self.helo} ([{literal}]){tls_comment}\n"
            f"\tby {self.config.server.hostname} (mailhost) with {protocol} id {queue_id}{for_clause}; {date}\n"
        ).encode("utf-8")

    def _tls_version(self) -> str | None:
        if not self.tls:
            return None
        try:
            connection = self.transport.getHandle()
            return f"{connection.get_protocol_version_name()} with cipher {connection.get_cipher_name()}"
        except Exception:
            return "TLS"


def _loop_check(body: bytes) -> Reply | None:
    """554 5.4.6 for a message that has been through more than HOP_LIMIT hosts."""
    if received_count(body[2:]) > HOP_LIMIT:  # body starts with the reader's CRLF
        return Reply(554, "5.4.6", f"Too many hops (more than {HOP_LIMIT} Received: headers): mail loop?")
    return None
