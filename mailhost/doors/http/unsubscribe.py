"""/unsubscribe/<token>: one-click unsubscribe (RFC 8058).

POST (any body: RFC 8058 3.1 says `List-Unsubscribe=One-Click`, as form-urlencoded or
multipart, and providers vary) suppresses the token's recipient for the token's sender
domain before the answer, and says so. GET only shows a page with a button that POSTs:
a link scanner or a preview that follows the link changes nothing (RFC 8058 4). A token
that is forged, garbled or made with another key gets 400 and changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from html import escape
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.unsubscribe import Unsubscribe, UnsubscribeTokens, record_unsubscribe

log = Logger(namespace="mailhost.http")

STYLE = ("body{font-family:sans-serif;max-width:36em;margin:4em auto;padding:0 1em;line-height:1.5}"
         "button{font-size:1em;padding:.5em 1.5em}")
# The page's one inline style, allowed by its hash and nothing else (CSP Level 2).
CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
       + "'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'").encode("ascii")


def page(title: str, body: str) -> bytes:
    """A small HTML page; `body` is HTML the caller has escaped."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}</body></html>\n").encode("utf-8")


class UnsubscribeResource(Resource):
    """Serves /unsubscribe/<token>; `run` calls a blocking function on a thread."""

    isLeaf = True

    def __init__(self, tokens: UnsubscribeTokens, suppression: SuppressionList,
                 run: Callable[..., Deferred[Any]]) -> None:
        super().__init__()
        self.tokens = tokens
        self.suppression = suppression
        self.run = run

    def render_GET(self, request: Any) -> bytes:
        found = self._request(request)
        if not isinstance(found, Unsubscribe):
            return found
        return self._page(request, 200, "Unsubscribe", (
            f"<p>Stop mail from <strong>{escape(found.scope)}</strong> to "
            f"<strong>{escape(found.recipient)}</strong>?</p>"
            '<form method="post" action=""><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'))

    def render_POST(self, request: Any) -> bytes | int:
        found = self._request(request)
        if not isinstance(found, Unsubscribe):
            return found
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(_: object) -> None:
            log.info("unsubscribed <{rcpt}> from mail of {scope} (https)", rcpt=found.recipient, scope=found.scope)
            if not gone:
                request.write(self._page(request, 200, "Unsubscribed", (
                    f"<p><strong>{escape(found.recipient)}</strong> will get no more mail from "
                    f"<strong>{escape(found.scope)}</strong>.</p>")))
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("unsubscribing <{rcpt}> from mail of {scope}", failure, rcpt=found.recipient,
                        scope=found.scope)
            if not gone:
                request.write(self._page(request, 500, "Not unsubscribed",
                                         "<p>Something went wrong on our side. Please try again later.</p>"))
                request.finish()

        self.run(record_unsubscribe, self.suppression, found, "https").addCallbacks(done, failed)
        return NOT_DONE_YET

    def _request(self, request: Any) -> Unsubscribe | bytes:
        """The token's request, or the 404/400 page to answer instead."""
        if len(request.postpath) != 1 or not request.postpath[0]:
            return pages.notFound().render(request)
        try:
            token = request.postpath[0].decode("ascii")
        except UnicodeDecodeError:
            token = ""
        found = self.tokens.verify(token) if token else None
        if found is None:
            return self._page(request, 400, "Not a valid unsubscribe link",
                              "<p>This link is incomplete or was changed. Please use the whole link from the "
                              "message, or reply to its sender.</p>")
        return found

    def _page(self, request: Any, code: int, title: str, body: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", CSP)
        return page(title, body)
