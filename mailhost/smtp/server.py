"""The SMTP server protocol (RFC 5321 with ESMTP extensions) and its factory.

One session reads whole network buffers: command lines are split with
bytes.find, DATA is handed to wire.MessageReader in the buffers it arrived in.
Commands run strictly in order; when one has to wait (the disk, before the
250 after DATA, a password check), the rest of the buffer waits behind it, so
pipelined replies always come back in order.

Roles: `mx` takes mail for the local domains from anyone (and relays for
relay.networks) and never offers AUTH; `submission` offers STARTTLS, then
AUTH, and wants AUTH before any transaction; `submissions` is the same inside
TLS from the first byte (RFC 8314).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailhost.config import Config
from mailhost.intake.cleanup import Incoming, Intake, Receipt, Refused
from mailhost.intake.origin import SMTP, Origin
from mailhost.intake.policy import SUBMISSION_ROLES, auth_required, check_sender
from mailhost.local.auth import AuthSlowdown, IMailSubmitter, Submitter
from mailhost.local.mailbox import LocalDomains
from mailhost.ops.metrics import Metrics
from mailhost.smtp import sasl
from mailhost.smtp.wire import (
    AUTH_LINE_MAX,
    COMMAND_LINE_MAX,
    Address,
    MessageReader,
    Reply,
    SMTPError,
    check_body,
    chunked_to_lf,
    parse_bdat,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_parameters,
    parse_path,
    parse_ret,
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
# Replies to pipelined commands are written in pieces of about this size, so that a
# peer that does not read stops us (pauseProducing) within one piece.
FLUSH_AT = 64 * 1024
# After a closing reply, how long the client has to read it before the connection is
# dropped: a client that does not read (or a TLS handshake that never comes) cannot
# hold the connection open by leaving our last reply unsent.
CLOSE_GRACE = 10.0
# Commands that move no mail (Postfix's smtpd_junk_command_limit counts NOOP, VRFY, RSET
# and ETRN): more than limits.junk_commands of them since the last accepted message end
# the session, so that a loop of them cannot hold it for ever.
JUNK = frozenset({"NOOP", "RSET", "VRFY", "HELP", "HELO", "EHLO"})
# An oversized message is read to its end (to answer 552 5.3.4 and go on, as Postfix
# does) up to this many times limits.message_size; past that it is refused and closed.
DATA_CAP = 2
# Commands that start or belong to a transaction: 530 before AUTH on the submission roles (RFC 4954 6).
NEEDS_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN"})

OK = Reply(250, "2.0.0", "Ok")


@dataclass
class ServerContext:
    """What every session of the daemon shares."""

    config: Config
    domains: LocalDomains
    intake: Intake
    tls_options: Any | None  # twisted IOpenSSLContextFactory (tls.ServerTLS), None when TLS is off
    portal: Portal  # AUTH: checks credentials, gives IMailSubmitter avatars
    slowdown: AuthSlowdown  # AUTH: shared by every listener, keyed by client address
    metrics: Metrics
    open_sessions: int = 0  # over every listener of this process, for limits.connections
    # Told open_sessions each time it changes (with server.workers > 1: mailhost.multiproc.loads).
    on_sessions: Callable[[int], None] | None = None
    # With server.workers > 1, which process this is (0 the main one, N worker N): the log's
    # connect and accepted lines say which took the connection, for every log format.
    process: int | None = None

    @property
    def process_field(self) -> str:
        return "" if self.process is None else f" process={self.process}"


@dataclass
class Transaction:
    sender: Address
    utf8: bool
    body_8bit: bool
    recipients: list[tuple[Address, Any]] = field(default_factory=list)
    # RFC 3461: RET and ENVID from MAIL; NOTIFY and ORCPT per RCPT address (str of the Address).
    ret: str | None = None
    envid: str | None = None
    notify: dict[str, list[str]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)
    # RFC 3030: the message so far in BDAT chunks (None: no BDAT yet), in check_body's form
    # (a leading CRLF). Past limits.message_size the chunks are counted, not kept.
    chunks: bytearray | None = None
    chunk_count: int = 0
    chunked_size: int = 0
    refusal: Reply | None = None  # a BDAT chunk was refused: every later one gets this too


class ChunkReader:
    """The octets of one BDAT chunk, as they arrive (RFC 3030 2: exactly `size` of them,
    whatever they contain). They go to the transaction's message while it is within the
    size limit, else are counted and dropped: memory stays bounded by the limit."""

    def __init__(self, size: int, last: bool, keep: bytearray | None) -> None:
        self.remaining = size
        self.last = last
        self._keep = keep  # None: read and drop (a refused chunk)

    def feed(self, data: bytes | bytearray) -> int:
        """Take what belongs to the chunk from the start of `data`; returns the octets taken."""
        taken = min(self.remaining, len(data))
        if self._keep is not None:
            self._keep += data[:taken]
        self.remaining -= taken
        return taken


class SMTPServerFactory(Factory):
    """Builds sessions for one listener and counts connections per client address."""

    def __init__(self, role: str, context: ServerContext, reactor: Any) -> None:
        self.role = role
        self.context = context
        self.reactor = reactor
        self.per_ip: Counter[str] = Counter()
        self.noisy = False

    @property
    def implicit_tls(self) -> bool:
        return self.role == "submissions"

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self)


def listener_factory(role: str, context: ServerContext, reactor: Any) -> IProtocolFactory:
    """What a listener of `role` serves: the submissions role speaks TLS from the first byte."""
    factory = SMTPServerFactory(role, context, reactor)
    if not factory.implicit_tls:
        return factory
    if context.tls_options is None:
        raise ValueError("the submissions role needs TLS options")
    return TLSMemoryBIOFactory(context.tls_options, False, factory)


@implementer(IHandshakeListener, IPushProducer)
class SMTPServer(Protocol, TimeoutMixin):
    """One SMTP session.

    It is its transport's streaming producer (of replies): when the client does
    not read and the transport's write buffer passes its limit, the transport
    calls pauseProducing(), and the session stops reading the client and stops
    running its buffered commands until resumeProducing() (DESIGN.md,
    "Backpressure everywhere").
    """

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.context = factory.context
        self.config = factory.context.config
        self.reactor = factory.reactor
        self._buffer = bytearray()
        self._reader: MessageReader | None = None
        self._chunk: ChunkReader | None = None  # mid-way through a BDAT chunk
        self._busy = False
        self._paused = False  # we paused the transport: it does not read the client
        self._write_blocked = False  # the transport paused us: the client does not read
        self._producing = False  # registered as the transport's producer
        self._again = False
        self._out_size = 0
        self._greeted = False
        self._closing = False
        self._skipping_long_line = 0  # mid-way through dropping a line longer than this
        self._pending_greeting: Any = None
        # A TLS handshake under way (implicit TLS from the first byte, or after STARTTLS):
        # until it ends nothing we write can reach the client.
        self._handshaking = False
        self._handshake_timer: Any = None
        self._abort_timer: Any = None
        self._shut = False  # loseConnection() or abortConnection() called
        self._aborted = False
        self._out: list[bytes] = []
        self.errors = 0
        self.junk = 0  # JUNK commands since the session began or the last accepted message
        self._counted = False  # in context.open_sessions
        self._deadline: Any = None
        self._deadline_passed = False
        self.helo: str | None = None
        self.esmtp = False
        self.tls = factory.implicit_tls
        self.transaction: Transaction | None = None
        self.client_ip = ""
        self.in_relay_networks = False
        self.user: Submitter | None = None
        self.auth_failures = 0
        # Mid-AUTH: what takes the client's next line (a base64 response), else None.
        self._auth_step: Callable[[str], Reply | Deferred[Reply] | None] | None = None

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
            self.in_relay_networks = any(ip in network for network in self.config.relay.networks)
        except ValueError:
            self.in_relay_networks = False
        self.factory.per_ip[self.client_ip] += 1
        self.context.open_sessions += 1
        self._counted = True
        if self.context.on_sessions is not None:
            self.context.on_sessions(self.context.open_sessions)
        self.context.metrics.sessions.labels(self.factory.role).inc()
        log.info("connect client=[{client}] role={role}{process}", client=self.client_ip, role=self.factory.role,
                 process=self.context.process_field)
        if self.factory.implicit_tls:
            self.context.metrics.tls_sessions.labels(self.factory.role).inc()
        limits = self.config.limits
        self.transport.registerProducer(self, True)
        self._producing = True
        if self.factory.implicit_tls:
            self._expect_handshake()
        if self.context.open_sessions > limits.connections:
            self._refuse_connection(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many connections, try again later"))
            return
        if self.factory.per_ip[self.client_ip] > limits.connections_per_ip:
            self._refuse_connection(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many connections from your address"))
            return
        self.setTimeout(limits.command_timeout)
        # The idle timer restarts with every byte; this does not.
        self._deadline = self.reactor.callLater(limits.session_timeout, self._session_deadline)
        if self.factory.role == "mx" and limits.greet_pause > 0 and not self.in_relay_networks:
            self._pending_greeting = self.reactor.callLater(limits.greet_pause, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._pending_greeting = None
        self._greeted = True
        self.transport.write(Reply(220, "", f"{self.config.server.hostname} ESMTP mailhost").encode())

    def _refuse_connection(self, reply: Reply) -> None:
        log.info("refused client=[{client}] reply={reply}", client=self.client_ip, reply=f"{reply.code} {reply.status} {reply.text}")
        self._out.append(reply.encode())
        self._close()

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        for timer in (self._pending_greeting, self._handshake_timer, self._abort_timer, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        if self._counted:
            self._counted = False
            self.context.open_sessions -= 1
            if self.context.on_sessions is not None:
                self.context.on_sessions(self.context.open_sessions)
        self.factory.per_ip[self.client_ip] -= 1
        if self.factory.per_ip[self.client_ip] <= 0:
            del self.factory.per_ip[self.client_ip]

    def timeoutConnection(self) -> None:
        if self._handshaking:
            # Our 421 would wait in the TLS layer for a handshake that is not coming.
            self._abort("idle during the TLS handshake")
            return
        self._refuse_connection(Reply(421, "4.4.2", f"{self.config.server.hostname} Timeout, closing connection"))

    def _session_deadline(self) -> None:
        if self._shut:
            return
        if self._handshaking:
            self._abort("session deadline during the TLS handshake")
        elif self._busy:
            # A reply is owed (the 250 after DATA is a promise): it goes out first (_resume).
            self._deadline_passed = True
        else:
            self._session_too_long()

    def _session_too_long(self) -> None:
        self._refuse_connection(Reply(421, "4.4.2", f"{self.config.server.hostname} Session too long, closing connection"))

    # --- TLS handshakes --------------------------------------------------------

    def _expect_handshake(self) -> None:
        """A TLS handshake starts: it must end within limits.tls_handshake_timeout."""
        self._handshaking = True
        self._handshake_timer = self.reactor.callLater(self.config.limits.tls_handshake_timeout,
                                                       self._abort, "TLS handshake timeout")
        self._update_reading()  # the handshake must be read, whatever paused us before

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS layer finished its handshake."""
        self._handshaking = False
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self._update_reading()

    def _abort(self, why: str) -> None:
        """Drop the connection at once, with whatever is still unsent."""
        if self._aborted:
            return
        self._aborted = True
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        log.info("aborted client=[{client}] {why}", client=self.client_ip, why=why)
        self._closing = self._shut = True
        self.setTimeout(None)
        self.transport.abortConnection()

    # --- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._greeted:
            self._refuse_connection(Reply(554, "5.5.1", "Protocol error: you talked before my greeting"))
            return
        self.resetTimeout()
        if self._reader is not None and not self._busy and not self._buffer and not self._write_blocked:
            # The common case in DATA: hand the buffer over without copying it.
            used = self._reader.feed(data)
            if self._reader.body is None:
                if self._reader.overflowed:
                    self._data_overflowed()
                return
            self._buffer += data[used:]
            self._end_of_data()
        elif self._chunk is not None and not self._busy and not self._buffer and not self._write_blocked:
            # The same for a BDAT chunk.
            taken = self._chunk.feed(data)
            if self._chunk.remaining:
                return
            self._buffer += data[taken:]
            self._end_of_chunk()
        else:
            self._buffer += data
        self._process()
        self._update_reading()

    # --- backpressure (IPushProducer) --------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: the client is not reading our replies."""
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer has drained: go on with buffered commands."""
        self._write_blocked = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        """The connection is going away (connectionLost follows)."""
        self._closing = True

    def _update_reading(self) -> None:
        """Read the client only while its replies can be written and input is not piling
        up behind a reply that waits. Never during a TLS handshake: the handshake's own
        bytes must be read, and the greeting waits in the TLS layer until it ends."""
        pause = not self._handshaking and (
            self._write_blocked or (self._busy and len(self._buffer) > PAUSE_BUFFER))
        if pause == self._paused or self._shut:
            return
        self._paused = pause
        if pause:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    _processing = False

    def _process(self) -> None:
        """Run whatever complete input is buffered, until it is used up, a reply must wait,
        or the client must read first."""
        if self._processing:
            # A reply that came at once (its Deferred had already fired), or the transport
            # resuming us from inside a write: the loop below goes round again.
            self._again = True
            return
        self._processing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._process_buffer()
                self._flush()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        while self._buffer and not self._busy and not self._closing and not self._write_blocked:
            if self._reader is not None:
                data = bytes(self._buffer)
                self._buffer.clear()
                used = self._reader.feed(data)
                if self._reader.body is None:
                    if self._reader.overflowed:
                        self._data_overflowed()
                    break
                self._buffer += data[used:]
                self._end_of_data()
                continue
            if self._chunk is not None:
                taken = self._chunk.feed(self._buffer)
                del self._buffer[:taken]
                if self._chunk.remaining:
                    break
                self._end_of_chunk()
                continue
            if not self._run_command_lines():
                break

    def _run_command_lines(self) -> bool:
        """Run buffered command lines; False when more input is needed."""
        buffer = self._buffer
        position = 0
        try:
            while (not self._busy and not self._closing and self._reader is None and self._chunk is None
                   and not self._write_blocked):
                if self._out_size >= FLUSH_AT:
                    self._flush()  # may pause us (pauseProducing): then the rest waits
                    continue
                limit = self._skipping_long_line or self._line_limit(buffer, position)
                end = buffer.find(b"\n", position)
                if end < 0:
                    if self._skipping_long_line or len(buffer) - position > limit:
                        # Drop the overlong line as it arrives; answer at its end.
                        self._skipping_long_line = limit
                        position = len(buffer)
                    return False
                line = bytes(buffer[position:end])
                position = end + 1
                if self._skipping_long_line or len(line) + 1 > limit:
                    self._skipping_long_line = 0
                    self._line_too_long(limit)
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if self._auth_step is not None:
                    self._auth_response(line)
                else:
                    self._command(line)
                if self._starting_tls:
                    # RFC 3207 4.2: nothing the client sent behind STARTTLS is kept.
                    position = len(buffer)
                    self._start_tls()
            return True
        finally:
            del buffer[:position]

    _starting_tls = False

    def _line_limit(self, buffer: bytearray, position: int) -> int:
        """How long the line starting at `position` may be, with its CRLF."""
        if self._auth_step is not None or buffer[position : position + 5].upper() == b"AUTH ":
            return AUTH_LINE_MAX
        return COMMAND_LINE_MAX

    def _line_too_long(self, limit: int) -> None:
        if self._auth_step is not None:
            # RFC 4954 4: an error ends the exchange, or the next command would be taken
            # for the SASL response.
            self._auth_step = None
            self._reply(Reply(500, "5.5.6", f"Authentication exchange line is too long (at most {limit} octets)"))
            return
        self._reply(Reply(500, "5.5.6", f"Line too long (at most {limit} octets)"))

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_size = 0
            self.transport.write(data)

    def _reply(self, reply: Reply) -> None:
        encoded = reply.encode()
        self._out.append(encoded)
        self._out_size += len(encoded)
        if reply.code == 421:
            # RFC 5321 3.8: a 421 means this side is closing the channel.
            self._close()
            return
        if reply.code in PROTOCOL_ERRORS:
            self.errors += 1
            if self.errors >= ERROR_LIMIT:
                self._out.append(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many errors, closing connection").encode())
                self._close()

    def _close(self) -> None:
        self._closing = True
        self._flush()
        if self._shut:
            return
        self._shut = True
        self.setTimeout(None)
        if self._producing:
            # A registered producer holds the connection open (loseConnection waits for it).
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        # loseConnection() waits until everything written is sent (in TLS, until the
        # handshake has ended): a client that does not read, or never finishes its
        # handshake, would keep the connection (and its buffers) for ever.
        self._abort_timer = self.reactor.callLater(CLOSE_GRACE, self._abort, "did not read its last reply")

    def _wait_for(self, deferred: Deferred[Reply]) -> None:
        """A reply that is not ready yet: hold all later input until it is."""
        self._busy = True
        self._flush()
        deferred.addCallbacks(self._resume, self._unexpected)

    def _unexpected(self, failure: Any) -> None:
        """Every wait answers (DESIGN.md): a bug, a broken key or a full disk is logged once,
        with its traceback, and the client is told to try later."""
        log.failure("unexpected error for client [{client}]; answered 451 4.3.0", failure, client=self.client_ip)
        self._resume(Reply(451, "4.3.0", "Local error in processing; try again later"))

    def _resume(self, reply: Reply) -> None:
        self._busy = False
        if self._closing:
            return
        self._reply(reply)
        if self._deadline_passed and not self._closing:
            self._session_too_long()
            return
        self._update_reading()
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
        if verb_text == "BDAT":
            self._bdat(argument)  # its chunk is read whatever the answer (so BDAT checks AUTH itself)
            return
        handler: Callable[[str], Reply | Deferred[Reply] | None] | None = getattr(self, f"smtp_{verb_text}", None)
        if handler is None or not verb_text.isalpha():
            self._reply(Reply(500, "5.5.1", "Unknown command"))
            return
        if verb_text in JUNK and self._junk():
            return
        if verb_text in NEEDS_AUTH:
            refusal = auth_required(self.factory.role, self.user is not None, self.tls)
            if refusal is not None:
                self._reply(refusal)
                return
        self._run(verb_text, handler, argument)

    def _junk(self) -> bool:
        """Count a command that moves no mail; True when that was one too many (and the
        session is closing)."""
        self.junk += 1
        if self.junk <= self.config.limits.junk_commands:
            return False
        log.info("refused client=[{client}] junk_commands={count}", client=self.client_ip, count=self.junk)
        self._reply(Reply(421, "4.7.0", f"{self.config.server.hostname} Too many junk commands, closing connection"))
        return True

    def _run(self, verb: str, handler: Callable[[str], Reply | Deferred[Reply] | None], argument: str) -> None:
        """Call a command (or AUTH step) handler and send, or wait for, its reply."""
        try:
            result = handler(argument)
        except SMTPError as e:
            result = e.reply
        except Exception:
            # A bug or an unreadable users file must not cost the session: say "try later".
            log.failure("{verb} from [{client}] failed", verb=verb, client=self.client_ip)
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
        self._known_origin = None
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
            "DSN",  # RFC 3461
            "CHUNKING",  # RFC 3030 (BDAT; not BINARYMIME)
        ]
        if self.context.tls_options is not None and not self.tls:
            lines.append("STARTTLS")
        if self.factory.role in SUBMISSION_ROLES and self.tls:
            # RFC 4954 4: offered only where it may be used, so never in plaintext.
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
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
        ret = envid = None
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
            elif key == "RET":
                ret = parse_ret(value)
            elif key == "ENVID":
                envid = parse_envid(value)
            else:
                return Reply(555, "5.5.4", f"Unsupported MAIL parameter {key}")
        if self.user is not None:
            refusal = check_sender(self.user.address, sender, self.context.domains)
            if refusal is not None:
                log.info("refused client=[{client}] user={user} from=<{sender}> reply={reply}", client=self.client_ip,
                         user=self.user.address, sender=str(sender), reply=f"{refusal.code} {refusal.status}")
                return refusal
        self.transaction = Transaction(sender, utf8, body_8bit, ret=ret, envid=envid)
        return Reply(250, "2.1.0", "Sender ok")

    def smtp_RCPT(self, argument: str) -> Reply | None:
        if self.transaction is None:
            return Reply(503, "5.5.1", "Error: need MAIL command first")
        if argument[:3].upper() != "TO:":
            return Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path = argument[3:].lstrip(" ")
        if path[:12].lower() == "<postmaster>" and path[12:13] in ("", " "):
            # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
            recipient, rest = Address("postmaster", self.context.domains.primary), path[12:].strip(" ")
        else:
            recipient, rest = parse_path(path, utf8=self.transaction.utf8, null_ok=False, kind="recipient")
        notify = orcpt = None
        for key, value in parse_parameters(rest).items():
            if not self.esmtp:
                return Reply(555, "5.5.4", "RCPT parameters need EHLO")
            if key == "NOTIFY":
                notify = list(parse_notify(value))
            elif key == "ORCPT":
                orcpt = parse_orcpt(value)
            else:
                return Reply(555, "5.5.4", f"Unsupported RCPT parameter {key[:40]}")
        if len(self.transaction.recipients) >= self.config.limits.recipients:
            # As Postfix's smtpd_recipient_overshoot_limit: a loop of these moves no mail.
            if self._junk():
                return None
            return Reply(452, "4.5.3", "Too many recipients")
        verdict = self.context.intake.recipient_verdict(recipient, self._origin(), str(self.transaction.sender))
        if not verdict.accepted:
            log.info(
                "refused client=[{client}] from=<{sender}> to=<{rcpt}> reply={reply}",
                client=self.client_ip, sender=str(self.transaction.sender), rcpt=str(recipient),
                reply=f"{verdict.reply.code} {verdict.reply.status} {verdict.reply.text}",
            )
            return verdict.reply
        self.transaction.recipients.append((recipient, verdict.resolution))
        if notify is not None:
            self.transaction.notify[str(recipient)] = notify
        if orcpt is not None:
            self.transaction.orcpt[str(recipient)] = orcpt
        return verdict.reply

    def smtp_DATA(self, argument: str) -> Reply:
        if argument:
            return Reply(501, "5.5.4", "Syntax: DATA (no argument)")
        if self.transaction is None:
            return Reply(503, "5.5.1", "Error: need MAIL command first")
        if self.transaction.chunk_count:
            # RFC 3030 2: DATA and BDAT are not mixed within a transaction.
            return Reply(503, "5.5.1", "Error: DATA after BDAT")
        if not self.transaction.recipients:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        size = self.config.limits.message_size
        self._reader = MessageReader(size, cap=DATA_CAP * size)
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
        return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH")

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
        # startTLS() hands us to the TLS layer as a new producer, which will not resume
        # a pause the plain transport gave us; the next write that does not fit pauses us again.
        self._write_blocked = False
        self._expect_handshake()
        self.tls = True
        self.context.metrics.tls_sessions.labels(self.factory.role).inc()
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None
        self.esmtp = False
        self.transaction = None
        self.user = None
        self._known_origin = None

    # --- AUTH (RFC 4954) -----------------------------------------------------

    def smtp_AUTH(self, argument: str) -> Reply | Deferred[Reply] | None:
        refusal = self._auth_refusal()
        if refusal is not None:
            return refusal
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if mechanism == "PLAIN":
            return self._auth_plain(initial) if initial else self._challenge("", self._auth_plain)
        if mechanism == "LOGIN":
            if initial:
                return self._login_username(initial)
            return self._challenge(sasl.LOGIN_USERNAME_PROMPT, self._login_username)
        return Reply(504, "5.5.4", f"Unrecognized authentication type (offered: {' '.join(sasl.MECHANISMS)})")

    def _auth_refusal(self) -> Reply | None:
        if self.factory.role not in SUBMISSION_ROLES:
            return Reply(502, "5.5.1", "AUTH is not available on this port (use submission)")
        if self.helo is None or not self.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if not self.tls:
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism (STARTTLS first)")
        if self.user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
        return None

    def _challenge(self, text: str, step: Callable[[str], Reply | Deferred[Reply] | None]) -> Reply:
        self._auth_step = step
        return Reply(334, "", text)

    def _auth_response(self, line: bytes) -> None:
        step, self._auth_step = self._auth_step, None
        assert step is not None
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._reply(Reply(501, "5.5.2", "Cannot decode response (not base64)"))
            return
        if text.strip() == sasl.CANCEL:
            self._reply(Reply(501, "5.5.2", "Authentication cancelled"))
            return
        self._run("AUTH", step, text)

    def _auth_plain(self, text: str) -> Deferred[Reply]:
        authzid, authcid, password = sasl.parse_plain(sasl.decode_response(text))
        # Acting for another identity (an authzid not one's own) is not offered.
        acting_for_other = bool(authzid) and authzid.lower() != authcid.lower()
        return self._login("PLAIN", "" if acting_for_other else authcid, password)

    def _login_username(self, text: str) -> Reply:
        username = sasl.utf8(sasl.decode_response(text))
        return self._challenge(sasl.LOGIN_PASSWORD_PROMPT, lambda answer: self._login_password(username, answer))

    def _login_password(self, username: str, text: str) -> Deferred[Reply]:
        return self._login("LOGIN", username, sasl.utf8(sasl.decode_response(text)))

    def _login(self, mechanism: str, username: str, password: str) -> Deferred[Reply]:
        """Check the credentials through the portal, after this address's slow-down (if any)."""
        credentials = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        delay = self.context.slowdown.delay(self.client_ip)
        login = self.context.portal.login
        if delay > 0:
            deferred = deferLater(self.reactor, delay, login, credentials, None, IMailSubmitter)
        else:
            deferred = maybeDeferred(login, credentials, None, IMailSubmitter)
        return deferred.addCallbacks(self._auth_succeeded, self._auth_failed,
                                     callbackArgs=(mechanism,), errbackArgs=(mechanism,))

    def _auth_succeeded(self, login: tuple[Any, Submitter, Any], mechanism: str) -> Reply:
        self.user = login[1]
        self._known_origin = None
        log.info("auth ok client=[{client}] user={user} mechanism={mechanism}",
                 client=self.client_ip, user=self.user.address, mechanism=mechanism)
        return Reply(235, "2.7.0", "Authentication successful")

    def _auth_failed(self, failure: Any, mechanism: str) -> Reply:
        if not failure.check(UnauthorizedLogin):
            log.error("auth error client=[{client}] mechanism={mechanism} error={error}",
                      client=self.client_ip, mechanism=mechanism, error=failure.getErrorMessage())
            return Reply(454, "4.7.0", "Temporary authentication failure")
        self.auth_failures += 1
        self.context.metrics.auth_failures.labels(self.factory.role).inc()
        from_address = self.context.slowdown.failed(self.client_ip)
        # Neither the password nor the name (sometimes a password typed in the wrong box) is logged.
        log.info("auth failed client=[{client}] mechanism={mechanism} session_failures={failures}"
                 " address_failures={total}", client=self.client_ip, mechanism=mechanism,
                 failures=self.auth_failures, total=from_address)
        refusal = Reply(535, "5.7.8", "Authentication credentials invalid")
        if self.auth_failures < self.config.limits.auth_failures:
            return refusal
        self._reply(refusal)
        return Reply(421, "4.7.0", f"{self.config.server.hostname} Too many authentication failures, closing connection")

    # --- BDAT (RFC 3030) ----------------------------------------------------------

    def _bdat(self, argument: str) -> None:
        """BDAT chunk-size [LAST]: the chunk's octets follow the command line at once
        (pipelined), so they are read to their end whatever the answer, and never taken
        for commands."""
        try:
            size, last = parse_bdat(argument)
        except ValueError:
            # Without a size the chunk's end is unknown, and what follows cannot be told apart
            # from commands: refuse and close, as Postfix does (521 5.5.4).
            self._reply(Reply(521, "5.5.4", "Syntax: BDAT chunk-size [LAST]; closing connection"))
            self._close()
            return
        limit = self.config.limits.message_size
        transaction = self.transaction
        total = size + (transaction.chunked_size if transaction is not None else 0)
        if total > DATA_CAP * limit:
            # Not worth reading (the DATA path's cap): refuse and close, without waiting for it.
            self.transaction = None
            reply = Reply(552, "5.3.4", f"Message size exceeds fixed limit of {limit} octets; closing connection")
            if transaction is not None:
                self._refuse_message(transaction, total, reply)
            else:
                self._reply(reply)
            self._close()
            return
        refusal = self._bdat_refusal()
        if size == 0 and not last and self._junk():
            return  # a loop of empty chunks moves no mail
        if transaction is not None and (refusal is None or refusal is transaction.refusal):
            transaction.chunked_size = total
            transaction.chunk_count += 1
            if refusal is None and total > limit:
                # Read to its end (to answer and go on, as for DATA), keeping nothing.
                transaction.refusal = refusal = Reply(
                    552, "5.3.4", f"Message size exceeds fixed limit of {limit} octets")
                transaction.chunks = None
            elif refusal is None and transaction.chunks is None:
                transaction.chunks = bytearray(b"\r\n")  # check_body's form, as MessageReader keeps it
        keep = transaction.chunks if refusal is None and transaction is not None else None
        self._chunk = ChunkReader(size, last, keep)
        self._chunk_refusal = refusal
        self.setTimeout(self.config.limits.data_timeout)
        if size == 0:
            self._end_of_chunk()

    _chunk_refusal: Reply | None = None

    def _bdat_refusal(self) -> Reply | None:
        """Why this BDAT's chunk is not taken (it is read and dropped all the same), or None."""
        refusal = auth_required(self.factory.role, self.user is not None, self.tls)
        if refusal is not None:
            return refusal
        transaction = self.transaction
        if transaction is None:
            return Reply(503, "5.5.1", "Error: need MAIL command first")
        if not transaction.recipients:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        return transaction.refusal  # RFC 3030 3: once a chunk is refused, the transaction has failed

    def _end_of_chunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        refusal, self._chunk_refusal = self._chunk_refusal, None
        self.setTimeout(self.config.limits.command_timeout)
        assert chunk is not None
        transaction = self.transaction
        if refusal is not None:
            if chunk.last and transaction is not None:
                self.transaction = None  # the client takes BDAT LAST's answer as the transaction's
                if transaction.refusal is refusal:
                    self._refuse_message(transaction, transaction.chunked_size, refusal)
                    return
            self._reply(refusal)
            return
        assert transaction is not None and transaction.chunks is not None
        if not chunk.last:
            self._reply(Reply(250, "2.0.0", f"Ok: {transaction.chunked_size} octets received"))
            return
        self.transaction = None
        body = transaction.chunks
        if not body.endswith(b"\r\n"):
            body += b"\r\n"  # the last line ends (a bare CR before it is still refused below)
        message = bytes(body)
        transaction.chunks = None
        problem = check_body(message)
        if problem is not None:
            self._refuse_message(transaction, transaction.chunked_size, problem)
            return
        self._receive(transaction, chunked_to_lf(message), transaction.chunked_size)

    # --- end of DATA ---------------------------------------------------------

    def _data_overflowed(self) -> None:
        """More than DATA_CAP times the size limit and still no end: refuse and stop reading."""
        reader, self._reader = self._reader, None
        transaction, self.transaction = self.transaction, None
        assert reader is not None and transaction is not None
        self._buffer.clear()
        self._refuse_message(transaction, reader.size, Reply(
            552, "5.3.4", f"Message size exceeds fixed limit of {self.config.limits.message_size} octets; closing connection"))
        self._close()

    def _end_of_data(self) -> None:
        reader, self._reader = self._reader, None
        transaction, self.transaction = self.transaction, None
        self.setTimeout(self.config.limits.command_timeout)
        assert reader is not None and reader.body is not None and transaction is not None
        if reader.oversized:
            self._refuse_message(transaction, reader.size, Reply(552, "5.3.4", f"Message size exceeds fixed limit of {self.config.limits.message_size} octets"))
            return
        problem = check_body(reader.body)
        if problem is not None:
            self._refuse_message(transaction, reader.size, problem)
            return
        self._receive(transaction, unstuff_to_lf(reader.body), reader.size)

    def _receive(self, transaction: Transaction, message: bytes, size: int) -> None:
        """Hand a whole message (LF line endings) to the intake; its reply waits for the disk."""
        resolved = {str(address): resolution for address, resolution in transaction.recipients}
        incoming = Incoming(str(transaction.sender), list(resolved), message,
                            body_8bit=transaction.body_8bit, smtputf8=transaction.utf8, resolved=resolved,
                            ret=transaction.ret, envid=transaction.envid, notify=transaction.notify,
                            orcpt=transaction.orcpt)
        deferred = self.context.intake.receive(incoming, self._origin())
        self._wait_for(deferred.addCallbacks(self._accepted, self._not_accepted, callbackArgs=(transaction, size),
                                             errbackArgs=(transaction, size)))

    _known_origin: Origin | None = None

    def _origin(self) -> Origin:
        """Who this session's mail is from, for the intake (kept until EHLO, STARTTLS or AUTH)."""
        if self._known_origin is None:
            self._known_origin = self._make_origin()
        return self._known_origin

    def _make_origin(self) -> Origin:
        return Origin(SMTP, role=self.factory.role, client_ip=self.client_ip, helo=self.helo or "",
                      user=self.user.address if self.user is not None else None,
                      relay_network=self.in_relay_networks, esmtp=self.esmtp, tls=self._tls_version())

    def _accepted(self, receipt: Receipt, transaction: Transaction, size: int) -> Reply:
        log.info(
            "{id}: accepted client=[{client}] helo={helo} tls={tls} from=<{sender}> to={rcpts} size={size}"
            " local={local} queued={queued}{chunks}{user}{process}",
            id=receipt.queue_id, client=self.client_ip, helo=self.helo, tls=self._tls_version() or "no",
            user=f" user={self.user.address}" if self.user is not None else "", process=self.context.process_field,
            sender=str(transaction.sender), rcpts=",".join(f"<{r}>" for r, _ in transaction.recipients), size=size,
            local=receipt.local, queued=receipt.queued,
            chunks=f" bdat_chunks={transaction.chunk_count}" if transaction.chunk_count else "",
        )
        self.context.metrics.received.labels(self.factory.role, "accepted").inc()
        self.junk = 0  # a session that moves mail may go on (RSET, NOOP between messages)
        return Reply(250, "2.0.0", f"Ok: queued as {receipt.queue_id}")

    def _not_accepted(self, failure: Any, transaction: Transaction, size: int) -> Reply | Any:
        if failure.check(Refused):
            self._refuse_message(transaction, size, failure.value.reply, send=False)
            return failure.value.reply
        return failure  # _unexpected answers it

    def _refuse_message(self, transaction: Transaction, size: int, reply: Reply, send: bool = True) -> None:
        kind = " smuggling-shape" if reply.status == "5.6.11" else ""
        log.info(
            "refused{kind} client=[{client}] from=<{sender}> size={size} reply={reply}", kind=kind,
            client=self.client_ip, sender=str(transaction.sender), size=size, reply=f"{reply.code} {reply.status} {reply.text}",
        )
        self.context.metrics.received.labels(self.factory.role, "refused").inc()
        if send:
            self._reply(reply)

    def _tls_version(self) -> str | None:
        if not self.tls:
            return None
        try:
            connection = self.transport.getHandle()
            return f"{connection.get_protocol_version_name()} with cipher {connection.get_cipher_name()}"
        except Exception:
            return "TLS"

