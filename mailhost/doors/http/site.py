"""The HTTPS site: TLS only, the same security headers on every answer, bounded requests.

Resources are added by path segment (`https_factory({b"unsubscribe": ...})`); anything
else is 404. A request body may be at most BODY_LIMIT bytes, unless the resource of its
first path segment says otherwise for its path (`body_limit`, e.g. the API's messages take
a whole mail message): the request line is seen before the body, so a body over its limit
is refused before it is read, whichever resource it is for. Plain HTTP is refused: the listener speaks TLS from the first byte, so a
plain request ends in a failed handshake, never in a page (RFC 8058 3.1 wants https).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from twisted.internet.interfaces import IOpenSSLContextFactory, IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import pages
from twisted.web.http import HTTPChannel
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


@runtime_checkable
class LimitsBodies(Protocol):
    """A resource whose requests may have bodies of another size than BODY_LIMIT."""

    def body_limit(self, path: bytes) -> int:
        """The most bytes a body for `path` (the rest after the resource's segment) may have."""
        ...

    def too_large(self, limit: int) -> tuple[bytes, bytes]:
        """The Content-Type and body of the 413 answer."""
        ...


class BoundedRequest(Request):
    """A request with the security headers and a body of at most its limit (BODY_LIMIT, or what
    its resource says): a larger one gets 413 and the connection is closed before the
    resource sees it."""

    refused = False
    target = b""  # the request-target, set by _Channel as the request line arrives

    def gotLength(self, length: int | None) -> None:
        self.body_received = 0
        self.body_limit, self.refusal = self.channel.site.resource.limit_for(self.target)
        if length is not None and length > self.body_limit:
            self.refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_received += len(data)
        if self.body_received > self.body_limit:
            self.refuse_body()
            return
        super().handleContentChunk(data)

    def refuse_body(self) -> None:
        """413 and close (RFC 9110 15.5.14), without reading the rest of the body."""
        if not self.refused:
            self.refused = True
            content_type, body = self.refusal
            head = b"HTTP/1.1 413 Content Too Large\r\n"
            if content_type:
                head += b"Content-Type: " + content_type + b"\r\n"
            self.channel.transport.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            self.channel.transport.loseConnection()

    def render(self, resrc: IResource) -> None:
        if self.refused:
            return  # answered already
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        super().render(resrc)


class _Channel(HTTPChannel):
    """HTTP/1.1 that tells each request its target as soon as the request line is read,
    so that its body limit is known before the body comes (BoundedRequest.gotLength)."""

    def lineReceived(self, line: bytes) -> None:
        known = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > known:  # that line was a request line: METHOD SP target SP version
            parts = line.split(b" ")
            self.requests[-1].target = parts[1] if len(parts) == 3 else b""


class Root(Resource):
    """/: the children put in, 404 for everything else."""

    def limit_for(self, target: bytes) -> tuple[int, tuple[bytes, bytes]]:
        """The body limit for a request-target, and the 413 answer (Content-Type, body)."""
        path = target.split(b"?", 1)[0]
        if path.startswith(b"/"):
            first, _, rest = path[1:].partition(b"/")
            child = self.children.get(first)
            if isinstance(child, LimitsBodies):
                limit = child.body_limit(rest)
                return limit, child.too_large(limit)
        return BODY_LIMIT, (b"", b"")

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
    """Also says which protocol to pick in the TLS handshake (ALPN, RFC 7301): without an
    answer Twisted's ALPN callback selects nothing and OpenSSL ends every handshake from a
    client that offers ALPN (every browser, curl) with an internal-error alert. HTTP/1.1
    only: the body limits and deadlines here are HTTP/1.1's."""

    protocol = _Deadline

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN (RFC 7301): HTTP/1.1. Twisted's TLS asks the factory inside TLS, this one;
        without an answer a client that offers ALPN (curl, every browser) got a handshake
        alert instead of a page."""
        return [b"http/1.1"]

    def __init__(self, wrapped: Any, reactor: Any) -> None:
        super().__init__(wrapped)
        self.reactor = reactor


class HttpsSite(Site):
    displayTracebacks = False
    noisy = False
    protocol = _Channel  # HTTP/1.1 only (no HTTP/2 is offered in the TLS handshake)

    def log(self, request: Any) -> None:
        """One line per request in mailhost's log; the path only up to its first segment,
        as the rest may be a token (a capability, and it names a recipient). No header and
        no query is logged: an API key (Authorization: Bearer) never reaches the log."""
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
