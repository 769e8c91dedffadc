"""/api/v1: routing, `Authorization: Bearer KEY` (RFC 6750), scopes, per-key rate limits and
JSON answers; the work itself is in the module of each job (messages, queue, suppressions,
events). Every blocking step (the key file, the spool, the lists) runs on the disk threads.

Status codes: 401 missing or unknown key, 403 wrong scope or sender, 404, 405 (with Allow),
413 too large (before the body is read: site.BoundedRequest), 415 wrong Content-Type, 400 bad
JSON or a bad or missing field, 422 refused, 429 with Retry-After, 500/503.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailhost.config import Config
from mailhost.doors.http.api import events as events_api
from mailhost.doors.http.api import messages, queue, suppressions
from mailhost.doors.http.api.errors import ApiError, error_body
from mailhost.doors.http.api.keys import ApiKey, ApiKeyError, ApiKeys
from mailhost.doors.http.api.openapi import openapi_document
from mailhost.doors.http.api.ratelimit import TokenBuckets
from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionError, SuppressionList
from mailhost.intake.cleanup import Intake
from mailhost.queue.spool import Spool

log = Logger(namespace="mailhost.http")

SMALL_BODY = 64 * 1024  # every request body but a message's
JSON_OVERHEAD = 4 / 3  # base64 attachments in a JSON body take a third more than in the message
LOOKBACK_EXTRA = 86400.0  # GET /messages/{id} looks this much further back than the queue's lifetime


@dataclass
class ApiContext:
    """What the API reads and changes; `config` is the running configuration (SIGHUP replaces it)."""

    config: Callable[[], Config]
    keys: ApiKeys
    intake: Intake
    spool: Spool
    suppression: SuppressionList
    events: EventLog | None
    run: Callable[..., Deferred[Any]]  # a blocking function on a disk thread
    clock: Any


@dataclass(frozen=True)
class Route:
    scope: str | None  # None: no key needed
    handler: str  # the ApiResource method


# (path pattern, with {} for one segment) -> method -> route
ROUTES: dict[tuple[str, ...], dict[bytes, Route]] = {
    ("openapi.json",): {b"GET": Route(None, "openapi")},
    ("messages",): {b"POST": Route("send", "post_message")},
    ("messages", "{}"): {b"GET": Route("read", "get_message")},
    ("queue",): {b"GET": Route("read", "get_queue")},
    ("suppressions",): {b"GET": Route("read", "get_suppressions"), b"POST": Route("admin", "post_suppression")},
    ("suppressions", "{}"): {b"DELETE": Route("admin", "delete_suppression")},
    ("events",): {b"GET": Route("read", "get_events")},
}


def match(segments: list[str]) -> tuple[dict[bytes, Route], list[str]] | None:
    """The routes of a path (its segments after /api/v1) and the values of its {} segments."""
    for pattern, methods in ROUTES.items():
        if len(pattern) == len(segments) and all(p == "{}" or p == s for p, s in zip(pattern, segments)):
            return methods, [s for p, s in zip(pattern, segments) if p == "{}"]
    return None


class ApiResource(Resource):
    """Serves /api (the site's child `api`); only /api/v1/... exists."""

    isLeaf = True

    def __init__(self, context: ApiContext) -> None:
        super().__init__()
        self.context = context
        self.buckets = TokenBuckets(context.clock)

    # --- body limits (site.LimitsBodies) ---------------------------------------------------

    def body_limit(self, path: bytes) -> int:
        """A message (raw, or in JSON with base64) may be as large as limits.message_size allows;
        every other body is small."""
        if path.rstrip(b"/") == b"v1/messages":
            return math.ceil(self.context.config().limits.message_size * JSON_OVERHEAD) + SMALL_BODY
        return SMALL_BODY

    def too_large(self, limit: int) -> tuple[bytes, bytes]:
        return b"application/json", error_body("too_large", f"the request body is over {limit} bytes")

    # --- answering ---------------------------------------------------------------------

    def render(self, request: Any) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: tuple[int, Any, tuple[tuple[bytes, bytes], ...]]) -> None:
            if gone:
                return
            status, payload, headers = result
            request.setResponseCode(status)
            for name, value in headers:
                request.setHeader(name, value)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(payload if isinstance(payload, bytes) else
                          json.dumps(payload, ensure_ascii=False).encode("utf-8"))
            request.finish()

        def failed(failure: Failure) -> tuple[int, Any, tuple[tuple[bytes, bytes], ...]]:
            error = failure.value
            if isinstance(error, ApiError):
                return error.status, error.body(), error.headers
            if isinstance(error, (ApiKeyError, SuppressionError)):
                log.error("API: {error}", error=str(error))  # a damaged state file: the operator must look
                return 503, error_body("unavailable", "a state file cannot be read; see the server's log"), ()
            log.failure("API request {method} failed", failure, method=request.method.decode("ascii", "replace"))
            return 500, error_body("internal_error", "the server failed; the request may be sent again"), ()

        Deferred.fromCoroutine(self._handle(request)).addErrback(failed).addCallback(answer)
        return NOT_DONE_YET

    async def _handle(self, request: Any) -> tuple[int, Any, tuple[tuple[bytes, bytes], ...]]:
        path = request.postpath
        try:
            segments = [unquote(s.decode("ascii"), errors="strict") for s in path]
        except UnicodeError:
            segments = []
        found = match(segments[1:]) if segments[:1] == ["v1"] else None
        if found is None:
            raise ApiError(404, "not_found", "no such API path (see /api/v1/openapi.json)")
        methods, values = found
        route = methods.get(request.method)
        if route is None:
            allowed = b", ".join(sorted(methods))
            raise ApiError(405, "method_not_allowed", f"use {allowed.decode()}", headers=((b"Allow", allowed),))
        key = None
        if route.scope is not None:
            key = await self._authorize(request, route.scope)
        status, payload = await getattr(self, route.handler)(request, key, *values)
        return status, payload, ()

    async def _authorize(self, request: Any, scope: str) -> ApiKey:
        header = request.getHeader(b"authorization") or b""
        challenge = ((b"WWW-Authenticate", b'Bearer realm="mailhost"'),)
        kind, _, token = header.partition(b" ")
        if kind.lower() != b"bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "send Authorization: Bearer KEY (made with `mailhost apikey add`)",
                           headers=challenge)
        key = await self.context.run(self.context.keys.find, token.strip().decode("ascii", "replace"))
        if key is None:
            raise ApiError(401, "invalid_key", "the API key is unknown or was deleted",
                           headers=((b"WWW-Authenticate", b'Bearer realm="mailhost", error="invalid_token"'),))
        wait = self.buckets.take(key.name, key.rate, key.burst)
        if wait:
            raise ApiError(429, "rate_limited", f"over {key.rate:g} requests per second for key {key.name}",
                           headers=((b"Retry-After", str(wait).encode("ascii")),))
        if not key.allows(scope):
            raise ApiError(403, "insufficient_scope", f"key {key.name} has scope {','.join(key.scopes)}; this needs "
                                                      f"{scope}" + ("" if scope == "admin" else " (or admin)"),
                           headers=((b"WWW-Authenticate",
                                     f'Bearer realm="mailhost", error="insufficient_scope", scope="{scope}"'.encode()),))
        return key

    # --- the routes -----------------------------------------------------------------------

    async def openapi(self, request: Any, key: None) -> tuple[int, Any]:
        return 200, openapi_document(self.context.config().limits.message_size)

    async def post_message(self, request: Any, key: ApiKey) -> tuple[int, Any]:
        config = self.context.config()
        request.content.seek(0)
        body = request.content.read()
        address = request.getClientAddress()
        submission = messages.parse_submission(key, request.getHeader(b"content-type"), body, request.args,
                                               getattr(address, "host", ""), config.limits.recipients,
                                               config.limits.message_size)
        return 202, await messages.submit(self.context.intake, submission)

    async def get_message(self, request: Any, key: ApiKey, queue_id: str) -> tuple[int, Any]:
        config = self.context.config()
        lookback = max(config.queue.lifetime, config.queue.marketing_lifetime) + LOOKBACK_EXTRA
        return 200, await self.context.run(queue.message_status, self.context.spool, self.context.events,
                                           queue_id.upper(), config.bounce_rules, lookback)

    async def get_queue(self, request: Any, key: ApiKey) -> tuple[int, Any]:
        query = queue.queue_query(request.args)
        return 200, await self.context.run(partial(queue.list_queue, self.context.spool,
                                                   self.context.config().bounce_rules, **query))

    async def get_suppressions(self, request: Any, key: ApiKey) -> tuple[int, Any]:
        query = suppressions.list_query(request.args)
        return 200, await self.context.run(partial(suppressions.list_entries, self.context.suppression, **query))

    async def post_suppression(self, request: Any, key: ApiKey) -> tuple[int, Any]:
        if messages.media_type(request.getHeader(b"content-type")) != "application/json":
            raise ApiError(415, "unsupported_media_type", "send application/json")
        request.content.seek(0)
        try:
            data = json.loads(request.content.read())
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, "bad_json", f"the body is not JSON: {error}"[:300]) from None
        added = await self.context.run(suppressions.add_entry, self.context.suppression, data, key.name)
        log.info("suppressed <{address}> (API key {key})", address=added["suppression"]["address"], key=key.name)
        return 201, added

    async def delete_suppression(self, request: Any, key: ApiKey, address: str) -> tuple[int, Any]:
        scope = events_api.text_param(request.args, "scope", 255)
        removed = await self.context.run(suppressions.remove_entry, self.context.suppression, address, scope)
        log.info("unsuppressed <{address}> (API key {key})", address=removed["removed"], key=key.name)
        return 200, removed

    async def get_events(self, request: Any, key: ApiKey) -> tuple[int, Any]:
        since, limit = events_api.events_query(request.args)
        if self.context.events is None:
            return 200, {"events": [], "next": since}
        return 200, await self.context.run(events_api.read_events, self.context.events, since, limit)
