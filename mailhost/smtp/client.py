"""The outbound SMTP client: mailhost's own protocol (RFC 5321, PIPELINING, STARTTLS, AUTH,
DSN parameters (RFC 3461) and BDAT (RFC 3030) where the server offers them).

`open_session` connects to one address, reads the greeting, says EHLO (HELO when
EHLO is refused), negotiates TLS as asked and authenticates; the returned
`ClientSession` then sends any number of messages, one transaction at a time,
each with a reply per recipient.

Reply lines are found in whole network buffers with bytes.find, and each reply
becomes a wire.Reply (wire.parse_reply, the codec the server encodes with); the
body goes out as one dot-stuffed buffer (wire.stuff_from_lf), never stuffed per chunk, or
to a server that offers CHUNKING as one `BDAT n LAST` chunk with no stuffing at all.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhost.smtp.wire import Reply, crlf_from_lf, format_orcpt, parse_reply, stuff_from_lf, xtext_encode
from mailhost.smtp.transport import make_eager

TLS_MODES = ("none", "opportunistic", "required", "starttls-verify", "implicit-verify")
REPLY_LINE_MAX = 4096  # octets per reply line; RFC 5321 says 512, real servers say more
REPLY_LINES_MAX = 100  # lines per reply
BODY_CHUNK = 256 * 1024  # bytes handed to the transport at a time while writing DATA
CLOSE_GRACE = 5.0  # seconds a closing connection may take before it is aborted
QUIT_ON_ERROR_TIMEOUT = 10.0  # seconds for the reply to QUIT after opening the session failed

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- results -----------------------------------------------------------------


class SessionError(Exception):
    """The session as a whole failed (connect refused/timeout, TLS failure, bad
    greeting/EHLO/AUTH, connection lost).

    `permanent` is True only for a 5xx reply to the greeting or to AUTH; what
    that means for the mail is the caller's decision.
    """

    def __init__(self, reason: str, reply: Reply | None = None, permanent: bool = False,
                 refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.permanent = permanent
        self.refused = refused  # the TCP connection was refused (a throttling signal)
        self.tls_version: str | None = None  # set when the session had TLS when it failed (for the log)
        self.tls_failure: TlsFailure | None = None  # set when TLS failed or a required peer check refused it


@dataclass(frozen=True)
class TlsFailure:
    """Why a session's TLS fell short: an RFC 8460 4.3 result type and a readable detail."""

    result_type: str  # starttls-not-supported, certificate-host-mismatch, validation-failure, ...
    detail: str


# A check of the server's certificate chain (leaf first, as presented), run once TLS is up
# and before any mail: None when it passes (MTA-STS, DANE: mailhost.delivery.tls_checks).
PeerCheck = Callable[[list[Any]], "TlsFailure | None"]


@dataclass
class SendResult:
    """The final reply per recipient address, as the addresses were passed in; whether the
    server took the DSN parameters (it offered DSN), and whether the body went by BDAT."""

    replies: dict[str, Reply]
    dsn: bool = False
    chunked: bool = False


@dataclass(frozen=True)
class DSNParameters:
    """What RFC 3461 passes on to a next hop that offers DSN: RET and ENVID for the
    transaction, NOTIFY and ORCPT ("addr-type;address", decoded) per recipient address."""

    ret: str | None = None
    envid: str | None = None
    notify: dict[str, list[str]] | None = None
    orcpt: dict[str, str] | None = None

    def mail(self) -> list[str]:
        params = [f"RET={self.ret}"] if self.ret else []
        return params + ([f"ENVID={xtext_encode(self.envid)}"] if self.envid else [])

    def rcpt(self, address: str) -> list[str]:
        notify = (self.notify or {}).get(address)
        orcpt = (self.orcpt or {}).get(address)
        if orcpt is None and notify is not None and address.isascii():
            orcpt = f"rfc822;{address}"  # RFC 3461 4.2: MAY be added, with the address as received
        params = [f"NOTIFY={','.join(notify)}"] if notify else []
        return params + ([f"ORCPT={format_orcpt(orcpt)}"] if orcpt else [])


# --- the protocol ------------------------------------------------------------


@dataclass
class _Waiter:
    """One reply the server owes us."""

    label: str  # what the reply answers, for error messages
    deferred: Deferred[Reply] | _Replies
    timeout: float
    tls_options: Any = None  # set for STARTTLS: switch to TLS the moment its 220 is read


class _Replies:
    """The replies to a pipelined group, gathered into one Deferred: a waiter's
    `callback`/`errback` land here instead of in a Deferred per command."""

    def __init__(self, count: int) -> None:
        self.deferred: Deferred[list[Reply]] = Deferred()
        self._replies: list[Reply] = []
        self._count = count

    def callback(self, reply: Reply) -> None:
        if not self.deferred.called:
            self._replies.append(reply)
            if len(self._replies) == self._count:
                self.deferred.callback(self._replies)

    def errback(self, error: BaseException) -> None:
        if not self.deferred.called:  # the first error is the session's; the rest repeat it
            self.deferred.errback(error)


class SMTPClientProtocol(Protocol):
    """Bytes in, replies out: a queue of Deferreds answered in order, with a timer for the oldest."""

    def __init__(self, reactor: Any, peer: str, greeting_timeout: float) -> None:
        self.reactor = reactor
        self.peer = peer
        self.greeting: Deferred[Reply] = Deferred()
        self.error: SessionError | None = None  # set once the session is beyond saving
        self.closing_reply: Reply | None = None  # a 421: the server is closing
        self.connected_now = False
        self.encrypted = False
        self._closing = False  # we asked to close
        self._greeting_timeout = greeting_timeout
        self._tls_unconfirmed = False  # TLS started, no reply read through it yet
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the lines so far of a multi-line reply
        self._waiters: deque[_Waiter] = deque()
        self._timer: Any = None
        self._timeout, self._timeout_label = 0.0, ""
        self._body: _BodyWriter | None = None
        self._lost: list[Deferred[None]] = []

    # --- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_now = True
        if hasattr(self.transport, "setTcpNoDelay"):
            # Commands are written whole and deliberately; Nagle would only delay them.
            self.transport.setTcpNoDelay(True)
        make_eager(self.transport)
        self._queue(_Waiter("greeting", self.greeting, self._greeting_timeout))

    def implicit_tls(self) -> None:
        """The transport is TLS from its first byte (wrapClientTLS)."""
        self.encrypted = True
        self._tls_unconfirmed = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_now = False
        self._cancel_timer()
        self._body = None
        if self.error is None:
            self.error = SessionError(self._describe_loss(reason))
            if self._tls_unconfirmed:
                self.error.tls_failure = TlsFailure("validation-failure", self.error.reason)
        self._fail_waiters(self.error)
        lost, self._lost = self._lost, []
        for deferred in lost:
            deferred.callback(None)

    def _describe_loss(self, reason: Failure) -> str:
        if self._tls_unconfirmed:
            return f"TLS handshake with {self.peer} failed: {describe_tls_failure(reason)}"
        if reason.check(net_error.ConnectionDone):
            return f"connection to {self.peer} closed by the server"
        return f"connection to {self.peer} lost: {reason.getErrorMessage()}"

    def when_lost(self) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        if self.connected_now:
            self._lost.append(deferred)
        else:
            deferred.callback(None)
        return deferred

    def fail(self, error: SessionError) -> None:
        """Give up on the session: every waiting reply fails with `error`, the connection is dropped."""
        if self.error is None:
            self.error = error
        self._cancel_timer()
        self._fail_waiters(self.error)
        if self.connected_now:
            self.transport.abortConnection()

    def _fail_waiters(self, error: SessionError) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.deferred.errback(error)

    # --- commands ------------------------------------------------------------

    def commands(self, lines: list[str], labels: list[str], timeout: float) -> Deferred[list[Reply]]:
        """Write command lines in one go (a pipelined group) and return their replies, in
        order, through one Deferred: it fails with the session's error if any reply does not come."""
        group = _Replies(len(lines))
        self._write_commands(lines, [_Waiter(label, group, timeout) for label in labels])
        return group.deferred

    def command(self, line: str, label: str, timeout: float, tls_options: Any = None) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        self._write_commands([line], [_Waiter(label, deferred, timeout, tls_options)])
        return deferred

    def _write_commands(self, lines: list[str], waiters: list[_Waiter]) -> None:
        problem = self.unusable_reason()
        if problem is not None:
            error = self.error or SessionError(problem)
            for waiter in waiters:
                waiter.deferred.errback(error)
            return
        for waiter in waiters:
            self._queue(waiter)
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def write_body(self, wire: bytes, block_timeout: float, end_timeout: float,
                   then: Callable[[], None] | None = None) -> Deferred[Reply]:
        """Write the DATA body (dot-stuffed, with its terminating dot) and return the reply to it.

        `then` runs once the whole body is in the transport, before the reply:
        what it writes (the next transaction's commands) goes out in the same
        send as the body when the body is small enough to be held back that long."""
        deferred: Deferred[Reply] = Deferred()
        problem = self.unusable_reason()
        if problem is not None:
            deferred.errback(self.error or SessionError(problem))
            return deferred
        self._queue(_Waiter("end of data", deferred, end_timeout))
        self._body = body = _BodyWriter(self, wire, block_timeout, end_timeout)
        corked = getattr(self.transport, "corked", None) if then is not None and len(wire) <= BODY_CHUNK else None
        with corked() if corked is not None else nullcontext():
            body.start()
            if then is not None and body.finished and self.unusable_reason() is None:
                then()
        return deferred

    def unusable_reason(self) -> str | None:
        if self.error is not None:
            return self.error.reason
        if not self.connected_now:
            return f"connection to {self.peer} is closed"
        if self.closing_reply is not None:
            return f"{self.peer} is closing the connection: {self.closing_reply}"
        if self._closing:
            return f"connection to {self.peer} is closing"
        return None

    def close(self) -> None:
        """Close after what is written has gone out; abort if that takes too long."""
        if not self.connected_now or self._closing:
            return
        self._closing = True
        self.transport.loseConnection()
        timer = self.reactor.callLater(CLOSE_GRACE, self._abort_if_open)
        self.when_lost().addCallback(lambda _: timer.active() and timer.cancel())

    def _abort_if_open(self) -> None:
        if self.connected_now:
            self.transport.abortConnection()

    # --- timers --------------------------------------------------------------

    def _queue(self, waiter: _Waiter) -> None:
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self.arm(waiter.timeout, waiter.label)

    def arm(self, timeout: float, label: str) -> None:
        """(Re)start the one timer: `timeout` seconds for the server to answer or take `label`."""
        self._timeout, self._timeout_label = timeout, label
        timer = self._timer
        if timer is not None and timer.active():
            if self.reactor.seconds() + timeout >= timer.getTime():
                timer.reset(timeout)  # later: only the call's time changes, cheaper than a new DelayedCall
                return
            # Sooner (a command's timeout after the end of data's): reset() would look the call
            # up in the reactor's list of every pending timed call, a search per message.
            timer.cancel()
        self._timer = self.reactor.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.fail(SessionError(f"timeout after {self._timeout:g}s waiting for {self.peer} ({self._timeout_label})"))

    # --- replies -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        buffer = self._buffer
        buffer += data
        position = 0
        try:
            while self.error is None:
                end = buffer.find(b"\n", position)
                if end < 0:
                    if len(buffer) - position > REPLY_LINE_MAX:
                        self.fail(SessionError(f"{self.peer} sent a reply line longer than {REPLY_LINE_MAX} octets"))
                    return
                if end - position > REPLY_LINE_MAX:
                    self.fail(SessionError(f"{self.peer} sent a reply line longer than {REPLY_LINE_MAX} octets"))
                    return
                line = bytes(buffer[position:end])
                position = end + 1
                reply = self._reply_line(line[:-1] if line.endswith(b"\r") else line)
                if reply is not None and self._reply_complete(reply):
                    # RFC 3207 5: anything after the 220 to STARTTLS was sent in
                    # the clear before the handshake, by the server or a man in
                    # the middle; none of it may count as a reply.
                    position = len(buffer)
        finally:
            del buffer[:position]

    def _reply_line(self, line: bytes) -> Reply | None:
        """Add one line to the reply being read; the reply (wire.parse_reply) once its last line is in."""
        if line[3:4] == b"-":
            self._lines.append(line)
            if len(self._lines) >= REPLY_LINES_MAX:  # and its last line is still to come
                self.fail(SessionError(f"{self.peer} sent a reply of more than {REPLY_LINES_MAX} lines"))
            return None
        if self._lines:
            lines = self._lines
            lines.append(line)
            self._lines = []
        else:
            lines = [line]
        try:
            return parse_reply(lines)
        except ValueError as e:
            self.fail(SessionError(f"{self.peer} sent a bad reply: {e}"))
            return None

    def _reply_complete(self, reply: Reply) -> bool:
        """Hand a reply to its waiter; True when the rest of the buffer must be dropped."""
        self._tls_unconfirmed = False
        if not self._waiters:
            if reply.code == 421:
                # A server timing out an idle session says so before it closes.
                self.closing_reply = reply
                self.close()
                return True
            self.fail(SessionError(f"{self.peer} sent a reply nobody asked for: {reply}", reply))
            return True
        waiter = self._waiters.popleft()
        cut_short = self._body is not None and not self._body.finished
        if self._body is not None:
            self._body.stop()
            self._body = None
        starting_tls = waiter.tls_options is not None and reply.code == 220
        if starting_tls:
            self._start_tls(waiter.tls_options)
        if self._waiters:
            self.arm(self._waiters[0].timeout, self._waiters[0].label)
        else:
            self._cancel_timer()
        if reply.code == 421:
            self._server_closing(waiter, reply)
            return True
        waiter.deferred.callback(reply)
        if cut_short:
            # The server answered DATA before our final dot; the rest of the body
            # would be read as commands.
            self.fail(SessionError(f"{self.peer} replied before the end of the message: {reply}", reply))
        return starting_tls

    def _server_closing(self, waiter: _Waiter, reply: Reply) -> None:
        """A 421 answers this command and, since the server is going away, every one behind it."""
        self.closing_reply = reply
        waiters = [waiter, *self._waiters]
        self._waiters.clear()
        self._cancel_timer()
        for each in waiters:
            each.deferred.callback(reply)
        self.close()

    def _start_tls(self, options: Any) -> None:
        self.transport.startTLS(options)
        self.encrypted = True
        self._tls_unconfirmed = True

    def peer_chain(self) -> list[Any]:
        """The certificates the server presented (pyOpenSSL X509, leaf first); [] without TLS."""
        if not self.encrypted or self.transport is None:
            return []
        try:
            return self.transport.getHandle().get_peer_cert_chain() or []
        except AttributeError:  # a transport without an OpenSSL handle
            return []

    @property
    def tls_version(self) -> str | None:
        if not self.encrypted or self._tls_unconfirmed:
            return None
        try:
            return self.transport.getHandle().get_protocol_version_name()
        except Exception:  # a transport without an OpenSSL handle
            return "TLS"


@implementer(IPushProducer)
class _BodyWriter:
    """Feeds the DATA body to the transport as fast as it drains.

    Each time the transport takes more, the server is making progress, so the
    data-block timer starts again (RFC 5321 4.5.3.2.5); after the last byte
    the timer for the final reply runs (4.5.3.2.6).
    """

    def __init__(self, protocol: SMTPClientProtocol, wire: bytes, block_timeout: float, end_timeout: float) -> None:
        self._protocol = protocol
        self._wire = wire
        self._offset = 0
        self._paused = False
        self._stopped = False
        self._block_timeout = block_timeout
        self._end_timeout = end_timeout
        self.finished = False

    def start(self) -> None:
        self._protocol.transport.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        transport = self._protocol.transport
        while not self._paused and not self._stopped and not self.finished:
            chunk = self._wire[self._offset : self._offset + BODY_CHUNK]
            self._offset += len(chunk)
            self.finished = self._offset >= len(self._wire)
            transport.write(chunk)
        if self._stopped:
            return
        if self.finished:
            self._protocol.arm(self._end_timeout, "reply to end of data")
        else:
            self._protocol.arm(self._block_timeout, "server to read the message")

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self.finished:
            self._write()

    def stopProducing(self) -> None:
        self._stopped = True

    def stop(self) -> None:
        """The reply to the body is in: let go of the transport."""
        if not self._stopped:
            self._stopped = True
            if self._protocol.connected_now:
                self._protocol.transport.unregisterProducer()


def describe_tls_failure(reason: Failure) -> str:
    """A readable cause for a failed handshake, from OpenSSL's or service_identity's error."""
    if reason.check(VerificationError):
        return "the certificate does not match the host name"
    if reason.check(SSL.Error):
        details = [entry[-1] for entry in (reason.value.args[0] if reason.value.args else []) if isinstance(entry, tuple)]
        return ", ".join(details) or str(reason.value)
    if reason.check(net_error.ConnectionDone, net_error.ConnectionLost):
        return "the server closed the connection"
    return reason.getErrorMessage()


# --- the session -------------------------------------------------------------


class ClientSession:
    """One connection to one server, greeted (and encrypted, authenticated) and ready for mail."""

    def __init__(self, protocol: SMTPClientProtocol, *, peer: str, helo: str, tls: str,
                 command_timeout: float, data_timeout: float, peer_check: PeerCheck | None = None,
                 enforce_check: bool = False) -> None:
        self._protocol = protocol
        self.peer = peer
        self._peer_check = peer_check
        self._enforce_check = enforce_check
        # What the peer check found (TLS-RPT): None when there was none or it passed.
        self.tls_failure: TlsFailure | None = None
        self.extensions: dict[str, str] = {}
        self._helo = helo
        self._tls_mode = tls
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._busy = False
        self._holder = 0  # counts operations: which one may clear _busy (see _exclusive)

    @property
    def tls_version(self) -> str | None:
        return self._protocol.tls_version

    @property
    def usable(self) -> bool:
        """Connected, and in a clean state for another transaction."""
        return not self._busy and self._protocol.unusable_reason() is None

    # --- opening -------------------------------------------------------------

    async def _start(self, auth: tuple[str, str] | None, tls_options: Any) -> None:
        greeting = await self._protocol.greeting
        if greeting.code != 220:
            raise SessionError(f"{self.peer} refused the session: {greeting}", greeting, permanent=greeting.permanent)
        await self._hello()
        if self._tls_mode not in ("none", "implicit-verify"):
            try:
                await self._start_tls(tls_options)
            except SessionError as e:
                if e.tls_failure is None and self._peer_check is not None and not self._protocol.encrypted:
                    e.tls_failure = TlsFailure("starttls-not-supported", e.reason)
                raise
        if self._peer_check is not None:
            self._check_peer()
        if auth is not None:
            await self._authenticate(*auth)

    def _check_peer(self) -> None:
        """Run the peer check on the TLS now up (after the EHLO inside it, before any mail).
        Enforced, a failure ends the session; otherwise it is only noted (MTA-STS testing)."""
        assert self._peer_check is not None
        if not self._protocol.encrypted:
            failure: TlsFailure | None = TlsFailure("starttls-not-supported", f"{self.peer} does not offer STARTTLS")
        else:
            failure = self._peer_check(self._protocol.peer_chain())
        self.tls_failure = failure
        if failure is not None and self._enforce_check:
            error = SessionError(f"{self.peer}: {failure.detail} ({failure.result_type})")
            error.tls_failure = failure
            raise error

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self._helo}", "EHLO")
        if reply.permanent:
            # RFC 5321 3.2: a server that does not know EHLO gets HELO.
            reply = await self._command(f"HELO {self._helo}", "HELO")
            if reply.code != 250:
                raise SessionError(f"{self.peer} refused HELO: {reply}", reply)
            self.extensions = {}
            return
        if reply.code != 250:
            raise SessionError(f"{self.peer} refused EHLO: {reply}", reply)
        self.extensions = parse_extensions(reply)

    async def _start_tls(self, tls_options: Any) -> None:
        mode = self._tls_mode
        if "STARTTLS" not in self.extensions:
            if mode == "opportunistic":
                return
            raise SessionError(f"{self.peer} does not offer STARTTLS, and TLS is required (tls={mode})")
        reply = await self._command("STARTTLS", "STARTTLS", tls_options=tls_options)
        if reply.code != 220:
            if mode == "opportunistic" and reply.code != 421:
                return  # still in a clean plaintext state; encryption was only a wish
            raise SessionError(f"{self.peer} refused STARTTLS: {reply}", reply)
        # RFC 3207 4.2: forget what the server said before TLS; ask again.
        await self._hello()

    async def _authenticate(self, username: str, password: str) -> None:
        if not self._protocol.encrypted and self._tls_mode != "none":
            raise SessionError(f"{self.peer}: not sending credentials without TLS (tls={self._tls_mode})")
        if "AUTH" not in self.extensions:
            raise SessionError(f"{self.peer} does not offer AUTH")
        mechanisms = self.extensions["AUTH"].upper().split()
        if "PLAIN" in mechanisms:
            reply = await self._auth_plain(username, password)
        elif "LOGIN" in mechanisms:
            reply = await self._auth_login(username, password)
        else:
            raise SessionError(f"{self.peer} offers no AUTH mechanism we speak (PLAIN, LOGIN): {self.extensions['AUTH']}")
        if reply.code != 235:
            raise SessionError(f"{self.peer} refused authentication as {username}: {reply}", reply, permanent=reply.permanent)

    async def _auth_plain(self, username: str, password: str) -> Reply:
        token = _b64(f"\0{username}\0{password}")
        reply = await self._command(f"AUTH PLAIN {token}", "AUTH")
        if reply.code == 334:
            # A server that ignores the initial response asks for it (RFC 4954 4).
            reply = await self._command(token, "AUTH")
        return reply

    async def _auth_login(self, username: str, password: str) -> Reply:
        reply = await self._command("AUTH LOGIN", "AUTH")
        for secret in (username, password):
            if reply.code != 334:
                return reply
            reply = await self._command(_b64(secret), "AUTH")
        if reply.code == 334:
            reply = await self._command("*", "AUTH")  # cancel a dialogue that will not end
        return reply

    async def _command(self, line: str, label: str, tls_options: Any = None) -> Reply:
        return await self._protocol.command(line, label, self._command_timeout, tls_options)

    # --- mail ----------------------------------------------------------------

    def send(self, sender: str, recipients: list[str], message: bytes, *, body_8bit: bool = False,
             smtputf8: bool = False, body_written: Callable[[], None] | None = None,
             dsn: DSNParameters | None = None) -> Deferred[SendResult]:
        """One transaction: the final reply for each recipient (SendResult), or SessionError.
        `dsn` goes on the MAIL and RCPT commands when the server offers DSN (RFC 3461 5.2).

        With PIPELINING, `body_written` is called once the body is written, before
        its reply: the session is then free for the next transaction, whose
        commands follow the end of data in the same send (RFC 2920 3.1: the
        message content may be the first "command" of a group)."""
        return self._exclusive(self._send(sender, recipients, message, body_8bit, smtputf8, body_written, dsn))

    def reset(self) -> Deferred[None]:
        """RSET; SessionError unless the server says 250."""
        return self._exclusive(self._reset())

    def quit(self) -> Deferred[None]:
        """QUIT, wait for the reply, close. Never fails."""
        return Deferred.fromCoroutine(self._quit(self._command_timeout))

    def abort(self) -> None:
        """Drop the connection now."""
        self._protocol.fail(SessionError(f"session with {self.peer} aborted"))

    def _exclusive(self, coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        """Run one operation at a time; a second one while busy is refused."""
        problem = "busy with another command" if self._busy else self._protocol.unusable_reason()
        if problem is not None:
            coroutine.close()
            failed: Deferred[Any] = Deferred()
            failed.errback(SessionError(f"session with {self.peer} cannot be used: {problem}"))
            return failed
        self._busy = True
        self._holder += 1
        holder = self._holder

        def done(result: Any) -> Any:
            if self._holder == holder:  # not handed over to the next transaction meanwhile
                self._busy = False
            return result

        return Deferred.fromCoroutine(coroutine).addBoth(done)

    async def _send(self, sender: str, recipients: list[str], message: bytes, body_8bit: bool, smtputf8: bool,
                    body_written: Callable[[], None] | None = None, dsn: DSNParameters | None = None) -> SendResult:
        unique = list(dict.fromkeys(recipients))
        if not unique:
            return SendResult({})
        refusal = self._refuse_before_sending(sender, unique, smtputf8)
        if refusal is not None:
            return SendResult({recipient: refusal for recipient in unique})
        # RFC 3030: to a server that offers CHUNKING the body goes as one BDAT LAST chunk
        # (no dot-stuffing, so nothing in it can end it early); BINARYMIME is not needed.
        chunking = "CHUNKING" in self.extensions
        wire = crlf_from_lf(message) if chunking else stuff_from_lf(message)
        size = len(wire) if chunking else message_size(wire)
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < size:
            refused = Reply(552, "5.3.4", f"Message of {size} octets exceeds the limit of {limit} at {self.peer} (RFC 1870)")
            return SendResult({recipient: refused for recipient in unique})
        passes_dsn = dsn is not None and "DSN" in self.extensions
        mail = self._mail_command(sender, size, body_8bit, smtputf8, dsn.mail() if passes_dsn and dsn else [])
        rcpts = [" ".join([f"RCPT TO:<{r}>", *(dsn.rcpt(r) if passes_dsn and dsn else [])]) for r in unique]
        lines = [mail, *rcpts] + ([] if chunking else ["DATA"])
        labels = ["MAIL", *("RCPT" for _ in unique)] + ([] if chunking else ["DATA"])
        if "PIPELINING" in self.extensions:
            replies = await self._pipelined(lines, labels)
        else:
            replies = await self._one_by_one(lines, labels, data=not chunking)
        written = body_written if "PIPELINING" in self.extensions else None
        if chunking:
            result = await self._finish_chunked(unique, replies, wire, written)
        else:
            result = await self._finish(unique, replies, wire, written)
        result.dsn = "DSN" in self.extensions
        return result

    def _refuse_before_sending(self, sender: str, recipients: list[str], smtputf8: bool) -> Reply | None:
        """A permanent reply for a transaction that must not be attempted here, else None."""
        if smtputf8 and "SMTPUTF8" not in self.extensions:
            return Reply(553, "5.6.7", f"{self.peer} does not offer SMTPUTF8, which this message needs (RFC 6531)")
        if any(_CONTROL.search(address) for address in (sender, *recipients)):
            # A CR or LF here would end the command line and start another one.
            return Reply(553, "5.1.3", "Control character in an address; not sent")
        return None

    def _mail_command(self, sender: str, size: int, body_8bit: bool, smtputf8: bool, extra: list[str]) -> str:
        params = list(extra)
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if body_8bit and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        return " ".join([f"MAIL FROM:<{sender}>", *params])

    async def _pipelined(self, lines: list[str], labels: list[str]) -> list[Reply]:
        """RFC 2920: MAIL, every RCPT and DATA in one write, the replies read in order."""
        return await self._protocol.commands(lines, labels, self._command_timeout)

    async def _one_by_one(self, lines: list[str], labels: list[str], data: bool = True) -> list[Reply]:
        """Without PIPELINING: wait for each reply; stop early when the transaction is lost.
        Commands not sent get the reply that made them pointless. `data`: the last line is
        DATA (else every line after MAIL is a RCPT)."""
        mail = await self._command(lines[0], labels[0])
        if not _positive(mail):
            return [mail] * len(lines)
        replies = [mail]
        end = len(lines) - 1 if data else len(lines)
        for line, label in zip(lines[1:end], labels[1:end]):
            replies.append(await self._command(line, label))
            if replies[-1].code == 421:
                return replies + [replies[-1]] * (len(lines) - len(replies))
        if not data:
            return replies
        if not any(_positive(reply) for reply in replies[1:]):
            return replies + [replies[-1]]  # no DATA without a recipient
        replies.append(await self._command(lines[-1], labels[-1]))
        return replies

    async def _finish(self, recipients: list[str], replies: list[Reply], wire: bytes,
                      body_written: Callable[[], None] | None = None) -> SendResult:
        mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
        accepted = _positive(mail) and any(_positive(reply) for reply in rcpts)
        final = data
        if data.code == 354:
            then = self._hand_over(body_written) if accepted and body_written is not None else None
            # RFC 2920 3.1: DATA may be accepted even with no recipient; then only the dot goes.
            end = await self._protocol.write_body(wire if accepted else b".\r\n", self._command_timeout,
                                                  self._data_timeout, then)
            if accepted:
                final = end
        else:
            await self._reset_quietly(mail)
        return _results(recipients, mail, rcpts, final)

    async def _finish_chunked(self, recipients: list[str], replies: list[Reply], wire: bytes,
                              body_written: Callable[[], None] | None = None) -> SendResult:
        """After MAIL and RCPT to a CHUNKING server: the message as `BDAT n LAST` (RFC 3030 2)."""
        mail, rcpts = replies[0], replies[1:]
        if not (_positive(mail) and any(_positive(reply) for reply in rcpts)):
            await self._reset_quietly(mail)
            return _results(recipients, mail, rcpts, mail)
        then = self._hand_over(body_written) if body_written is not None else None
        chunk = f"BDAT {len(wire)} LAST\r\n".encode("ascii") + wire
        final = await self._protocol.write_body(chunk, self._command_timeout, self._data_timeout, then)
        result = _results(recipients, mail, rcpts, final)
        result.chunked = True
        return result

    def _hand_over(self, body_written: Callable[[], None]) -> Callable[[], None]:
        def hand_over() -> None:
            # The end-of-data reply is still to come; the next transaction's replies queue behind it.
            self._busy = False
            self._holder += 1
            body_written()

        return hand_over

    async def _reset_quietly(self, mail: Reply) -> None:
        """End a transaction that did not reach the body. A failed RSET leaves the session unusable."""
        if not _positive(mail) and "PIPELINING" not in self.extensions:
            return  # nothing was started
        if self._protocol.unusable_reason() is not None:
            return
        reply = await self._command("RSET", "RSET")
        if reply.code != 250 and reply.code != 421:
            # The server's transaction state is now unknown: the session is done.
            self._protocol.fail(SessionError(f"{self.peer} refused RSET: {reply}", reply))

    async def _reset(self) -> None:
        reply = await self._command("RSET", "RSET")
        if reply.code != 250:
            # The server's transaction state is now unknown: the session is done.
            error = SessionError(f"{self.peer} refused RSET: {reply}", reply)
            self._protocol.fail(error)
            raise error

    async def _quit(self, timeout: float) -> None:
        protocol = self._protocol
        if protocol.unusable_reason() is None and not self._busy:
            try:
                await protocol.command("QUIT", "QUIT", timeout)
            except SessionError:
                pass
        protocol.close()
        await protocol.when_lost()


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-cased) -> the rest of their line; the first line is the greeting."""
    extensions: dict[str, str] = {}
    legacy_auth = None
    for line in reply.text.split("\n")[1:]:
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            # Pre-RFC 4954 servers write "AUTH=LOGIN PLAIN".
            legacy_auth = " ".join(filter(None, [keyword[5:], rest.strip()]))
        elif keyword:
            extensions[keyword] = rest.strip()
    if legacy_auth is not None:
        extensions.setdefault("AUTH", legacy_auth)
    return extensions


def message_size(wire: bytes) -> int:
    """RFC 1870's size: octets with CRLFs, without the stuffed dots and the terminating dot."""
    body = wire[:-3]
    return len(body) - (b"\r\n" + body).count(b"\r\n.")


def _results(recipients: list[str], mail: Reply, rcpts: list[Reply], final: Reply) -> SendResult:
    """Each recipient's reply: MAIL's refusal, else its RCPT's refusal, else the end of data's."""
    return SendResult({recipient: mail if not _positive(mail) else rcpt if not _positive(rcpt) else final
                       for recipient, rcpt in zip(recipients, rcpts)})


def _positive(reply: Reply) -> bool:
    return 200 <= reply.code < 300


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# --- opening a session -------------------------------------------------------


def open_session(reactor: Any, *, host: str, address: str, port: int, helo: str, tls: str,
                 trust_root: Any = None, auth: tuple[str, str] | None = None,
                 connect_timeout: float = 30, command_timeout: float = 300, data_timeout: float = 600,
                 peer_check: PeerCheck | None = None, enforce_check: bool = False,
                 ) -> Deferred[ClientSession]:
    """Connect to `address`:`port` (the server named `host`), greet, negotiate TLS, authenticate.

    With `peer_check`, the certificate chain is checked once TLS is up: `enforce_check`
    makes a failure (or no TLS) a SessionError carrying `tls_failure`; otherwise the
    session goes on and keeps the result in `tls_failure` (MTA-STS testing mode)."""
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    ipaddress.ip_address(address)  # ValueError now, not a failed Deferred later
    return Deferred.fromCoroutine(_open(
        reactor, host=host, address=address, port=port, helo=helo, tls=tls, trust_root=trust_root, auth=auth,
        connect_timeout=connect_timeout, command_timeout=command_timeout, data_timeout=data_timeout,
        peer_check=peer_check, enforce_check=enforce_check,
    ))


async def _open(reactor: Any, *, host: str, address: str, port: int, helo: str, tls: str, trust_root: Any,
                auth: tuple[str, str] | None, connect_timeout: float, command_timeout: float, data_timeout: float,
                peer_check: PeerCheck | None = None, enforce_check: bool = False,
                ) -> ClientSession:
    peer = f"{host}[{address}]:{port}"
    options = tls_options(tls, host, trust_root)
    if peer_check is not None and tls in ("opportunistic", "required"):
        # The check reads the chain itself; the server still learns which name we want (SNI,
        # RFC 7672 8.1), so that it shows the certificate for that name. An enforced policy
        # also means TLS 1.2 or newer (RFC 8461 4.2: "TLS version 1.2 or higher").
        minimum = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2} if enforce_check else {}
        options = _WithServerName(ssl.CertificateOptions(verify=False, **minimum), host)
    endpoint: Any = (TCP6ClientEndpoint if ipaddress.ip_address(address).version == 6 else TCP4ClientEndpoint)(
        reactor, address, port, timeout=connect_timeout)
    if tls == "implicit-verify":
        endpoint = wrapClientTLS(options, endpoint)
    # RFC 5321 4.5.3.2.1 gives the greeting 5 minutes; command_timeout defaults to that.
    protocol = SMTPClientProtocol(reactor, peer, command_timeout)
    if tls == "implicit-verify":
        protocol.implicit_tls()
    try:
        await connectProtocol(endpoint, protocol)
    except Exception as e:
        refused = isinstance(e, (ConnectionRefusedError, net_error.ConnectionRefusedError))
        raise SessionError(f"connect to {peer}: {describe_connect_failure(e, connect_timeout)}", refused=refused) from None
    session = ClientSession(protocol, peer=peer, helo=helo, tls=tls, command_timeout=command_timeout,
                            data_timeout=data_timeout, peer_check=peer_check, enforce_check=enforce_check)
    try:
        await session._start(auth, options)
    except Exception as e:
        if isinstance(e, SessionError):
            e.tls_version = session.tls_version  # e.g. AUTH refused inside TLS
        # Leave politely when the server can still hear it (RFC 5321 3.1 after
        # a 554 greeting), but do not let a silent server hold up the error.
        await session._quit(min(command_timeout, QUIT_ON_ERROR_TIMEOUT))
        raise
    return session


def tls_options(mode: str, host: str, trust_root: Any) -> Any:
    """What startTLS / wrapClientTLS get for `mode`; None for "none"."""
    if mode == "none":
        return None
    if mode in ("opportunistic", "required"):
        # Encrypt whatever certificate the server shows: better than plaintext (RFC 7435).
        return ssl.CertificateOptions(verify=False)
    return ssl.optionsForClientTLS(
        host, trust_root if trust_root is not None else ssl.platformTrust(),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


@implementer(IOpenSSLClientConnectionCreator)
class _WithServerName:
    """Unverified client TLS options that also send SNI for `host`."""

    def __init__(self, options: ssl.CertificateOptions, host: str) -> None:
        self._options = options
        self._name = host.encode("idna") if not _is_address(host) else b""

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        if self._name:
            connection.set_tlsext_host_name(self._name)
        return connection


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_connect_failure(error: Exception, timeout: float) -> str:
    if isinstance(error, net_error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(error, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return f"Connection timed out after {timeout:g}s"
    if isinstance(error, net_error.NoRouteError):
        return "No route to host"
    return str(error) or type(error).__name__
