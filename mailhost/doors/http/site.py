"""The HTTPS site: TLS only, the same security headers on every answer, bounded requests.

Resources are added by path segment (`https_factory({b"unsubscribe": ...})`); anything
else is 404. Plain HTTP is refused: the listener speaks TLS from the first byte, so a
plain request ends in a failed handshake, never in a page (RFC 8058 3.1 wants https).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IOpenSSLContextFactory, IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

log = Logger(namespace="mailhost.http")

BODY_LIMIT = 64 * 1024  # bytes of a request body; a one-click POST is 26
IDLE_TIMEOUT = 20.0  # seconds without a byte (the TLS handshake included): the connection is closed
CONNECTION_DEADLINE = 60.0  # seconds a connection may last at most, however busy (no slow trickle)

# Every answer: HTTPS only from now on (RFC 6797), nothing loaded from anywhere, no framing,
# no sniffing, no caching (a page names a recipient), no referrer (the URL holds a token).
# A resource may set its own Content-Security-Policy (styles it needs) after these.
SECURITY_HEADERS = (
    (b"Strict-Transport-Security", b"max-age=31536000"),
    (b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
    (b"Server", b"mailhost"),  # no versions
)


class BoundedRequest(Request):
    """A request with the security headers and a body of at most BODY_LIMIT bytes: a larger
    one gets 413 and the connection is closed before the resource sees it."""

    refused = False

    def gotLength(self, length: int | None) -> None:
        self.body_received = 0
        if length is not None and length > BODY_LIMIT:
            self.refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_received += len(data)
        if self.body_received > BODY_LIMIT:
            self.refuse_body()
            return
        super().handleContentChunk(data)

    def refuse_body(self) -> None:
        """413 and close (RFC 9110 15.5.14), without reading the rest of the body."""
        if not self.refused:
            self.refused = True
            self.channel.transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n"
                                         b"Connection: close\r\n\r\n")
            self.channel.transport.loseConnection()

    def render(self, resrc: IResource) -> None:
        if self.refused:
            return  # answered already
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        super().render(resrc)


class Root(Resource):
    """/: the children put in, 404 for everything else."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        return pages.notFound()

    def render(self, request: Any) -> bytes:
        return pages.notFound().render(request)


class _Deadline(ProtocolWrapper):
    """Aborts the connection CONNECTION_DEADLINE seconds after it was made."""

    def makeConnection(self, transport: Any) -> None:
        self.timer = self.factory.reactor.callLater(CONNECTION_DEADLINE, transport.abortConnection)
        super().makeConnection(transport)

    def connectionLost(self, reason: Any) -> None:
        if self.timer.active():
            self.timer.cancel()
        super().connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class _DeadlineFactory(WrappingFactory):
    protocol = _Deadline

    def __init__(self, wrapped: Any, reactor: Any) -> None:
        super().__init__(wrapped)
        self.reactor = reactor

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN (RFC 7301): HTTP/1.1. Twisted's TLS asks the factory it wraps; without an answer
        it selects nothing and the handshake of every client that offers ALPN (curl, browsers,
        Go's MTA-STS fetchers) ends in an "internal error" alert."""
        return [b"http/1.1"]


class HttpsSite(Site):
    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        """One line per request in mailhost's log; the path only up to its first segment,
        as the rest may be a token (a capability, and it names a recipient)."""
        parts = request.path.split(b"/")
        first = parts[1][:40].decode("ascii", "replace") if len(parts) > 1 else ""
        address = request.getClientAddress()
        log.info("http {method} /{path} {code} client=[{client}]", method=request.method.decode("ascii", "replace"),
                 path=first, code=request.code, client=getattr(address, "host", ""))


def make_site(children: Mapping[bytes, IResource]) -> Site:
    """The site serving `children` (path segment -> resource) under /."""
    root = Root()
    for name, child in children.items():
        root.putChild(name, child)
    site = HttpsSite(root, requestFactory=BoundedRequest, timeout=IDLE_TIMEOUT)
    return site


def https_factory(children: Mapping[bytes, IResource], tls: IOpenSSLContextFactory, reactor: Any) -> TLSMemoryBIOFactory:
    """What the `[http] endpoint` listens with: `make_site(children)` inside TLS (the server's
    pair, `tls`, which hands new connections its newest context after a SIGHUP)."""
    return TLSMemoryBIOFactory(tls, False, _DeadlineFactory(make_site(children), reactor))
