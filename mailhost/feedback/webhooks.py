"""Webhooks: every `[[webhook]]` gets the events it subscribed to as signed HTTP POSTs.

One sender per webhook, in the main process only (the log is shared by every process):
it reads the event log after its cursor, posts one event at a time, strictly in log
order, and moves its cursor on (state_dir/events/webhook-<key>.cursor, written durably)
only after the receiver answered 2xx: at least once, in order, across restarts and
kill -9. The body carries the event's unique `id`, repeated in X-Mailhost-Event-Id, so a
receiver drops a second copy.

Signature (when the webhook has a secret_file): `X-Mailhost-Signature: t=<unix time>,v1=<hex>`
where hex = HMAC-SHA256(secret, "<t>." + body), the body being the exact bytes received.
A receiver recomputes it over the raw body, compares in constant time, and refuses a t
too far from its clock (`verify` below is the recipe).

Retries: a connection failure, a timeout or any non-2xx answer is retried after
min(5 min, 1 s * 2^(n-1)) scaled by a random factor in [0.5, 1] (n: failures in a row),
for ever; only 400, 413 and 422 (the receiver refuses this very request) end after five
tries, with an error line naming the event, so one event cannot stall the stream. One
webhook down holds up no other. New events are noticed by one stat of the log a second.

`format = "listmonk"` posts bounced and complained events only, as listmonk's bounce
webhook body (POST /webhooks/bounce: email, campaign_uuid, source, type hard|soft|complaint,
meta), authenticated with listmonk's `Authorization: token user:password`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from mailhost.config import WebhookConfig
from mailhost.feedback.events import EventLog
from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import make_dirs

log = Logger(namespace="mailhost.webhooks")

SIGNATURE_HEADER = "X-Mailhost-Signature"
EVENT_ID_HEADER = "X-Mailhost-Event-Id"
POLL_SECONDS = 1.0  # one stat of the log a second while idle
TRIM_SECONDS = 600.0
BATCH = 200  # events read from the log at a time
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0
CONNECT_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 30.0  # the whole request: connect, send, answer, body
BODY_CAP = 16 * 1024  # of a receiver's answer: only logged
REFUSED = (400, 413, 422)  # the receiver says this request itself is wrong
REFUSED_TRIES = 5
LISTMONK_KINDS = ("bounced", "complained")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_INVALID_RECIPIENT = re.compile(r"5\.1\.(1|2|3|6|10)$")  # RFC 3463 3.2: bad address (before the classifier says)


class WebhookSetupError(Exception):
    """A file a webhook names cannot be read; str(error) says which and why."""


# --- what is posted ---------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The X-Mailhost-Signature value for `body` sent at `timestamp`."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does: parse t and v1, recompute over the raw body, compare in constant
    time, and refuse a timestamp more than `tolerance` seconds away (a replayed request)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


def backoff(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next try after `failures` failures in a row (exponential, capped, jittered)."""
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(failures - 1, 30)) * (0.5 + rand() / 2)


def listmonk_bounce(event: dict[str, Any]) -> dict[str, Any] | None:
    """The event as listmonk's bounce webhook wants it; None for a kind listmonk takes no bounce for."""
    kind = event.get("event")
    if kind not in LISTMONK_KINDS:
        return None
    category = str(event.get("class") or "")
    if kind == "complained":
        bounce_type = "complaint"
    elif category == "invalid_recipient" or (not category and _INVALID_RECIPIENT.match(str(event.get("status", "")))):
        bounce_type = "hard"
    else:
        bounce_type = "soft"
    meta = {key: event[key] for key in ("id", "event", "queue_id", "sender", "message_id", "status", "reply",
                                        "remote_mta") if event.get(key)}
    if category:
        meta["class"] = category
    body: dict[str, Any] = {"email": event.get("recipient", ""), "source": "mailhost", "type": bounce_type,
                            "meta": meta}
    campaign = str(event.get("campaign", ""))
    if _UUID.fullmatch(campaign):  # listmonk casts it to a UUID: anything else would fail the insert
        body["campaign_uuid"] = campaign.lower()
    if isinstance(event.get("time"), (int, float)):
        body["created_at"] = datetime.fromtimestamp(event["time"], timezone.utc).isoformat().replace("+00:00", "Z")
    return body


def payload(event: dict[str, Any], hook: WebhookConfig) -> bytes | None:
    """The body to post for `event`, or None when this webhook does not take it."""
    if event.get("event") not in hook.events:
        return None
    if hook.format == "listmonk":
        converted = listmonk_bounce(event)
        if converted is None:
            return None
        return json.dumps(converted, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class Hook:
    """A [[webhook]] ready to use: its settings and the contents of the files it names."""

    config: WebhookConfig
    key: str  # names its cursor file
    secret: bytes | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    ca_pem: bytes | None = None

    def headers(self, event: dict[str, Any], body: bytes, now: float) -> dict[str, str]:
        found = {"Content-Type": "application/json", "User-Agent": "mailhost-webhook",
                 EVENT_ID_HEADER: str(event.get("id", "")), "X-Mailhost-Event": str(event.get("event", ""))}
        if self.secret:
            found[SIGNATURE_HEADER] = sign(self.secret, body, int(now))
        if self.config.username is not None and self.password is not None:
            pair = f"{self.config.username}:{self.password}"
            if self.config.format == "listmonk":
                found["Authorization"] = f"token {pair}"  # listmonk's API user and token
            else:
                found["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        return found


def prepare(configs: tuple[WebhookConfig, ...]) -> list[Hook]:
    """Read each webhook's secret, password and CA files (blocking; at start and SIGHUP)."""
    hooks = []
    seen: dict[str, int] = {}
    for config in configs:
        key = hashlib.sha256(f"{config.format} {config.url}".encode("utf-8")).hexdigest()[:16]
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # the same URL twice: each keeps its own cursor
            key = f"{key}-{seen[key]}"
        secret = _read(config.secret_file)
        password = _read(config.password_file)
        ca_pem = _read(config.ca_file)
        if ca_pem is not None and not _pem_certificates(ca_pem):
            raise WebhookSetupError(f"{config.ca_file}: no PEM certificate in it")
        hooks.append(Hook(config, key, secret, password.decode("utf-8", "replace") if password is not None else None,
                          ca_pem))
    return hooks


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().strip()
    except OSError as e:
        raise WebhookSetupError(f"{path}: {e.strerror}") from None


def _pem_certificates(pem: bytes) -> list[bytes]:
    return re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)


# --- how it is posted -------------------------------------------------------------------------


class _CappedBody(protocol.Protocol):
    """Keeps the first BODY_CAP bytes of an answer; a longer one is cut off."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data[: BODY_CAP - len(self.data)]
        if len(self.data) >= BODY_CAP:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


class Poster:
    """POSTs with twisted.web's Agent: verified TLS (the system's CAs, or ca_file), a connect
    timeout, a deadline for the whole request, one kept-alive connection."""

    def __init__(self, reactor: Any, ca_pem: bytes | None) -> None:
        self.reactor = reactor
        if ca_pem is None:
            policy = BrowserLikePolicyForHTTPS()
        else:
            roots = [Certificate.loadPEM(pem) for pem in _pem_certificates(ca_pem)]
            policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(roots))
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=CONNECT_TIMEOUT, pool=self.pool)

    def post(self, url: str, headers: dict[str, str], body: bytes) -> Deferred[tuple[int, bytes]]:
        """Fires with (status code, the start of the answer's body)."""
        sent = self.agent.request(b"POST", url.encode("utf-8"),
                                  Headers({k.encode("ascii"): [v.encode("utf-8")] for k, v in headers.items()}),
                                  FileBodyProducer(BytesIO(body)))

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            reader: _CappedBody | None = None

            def abort(_: Deferred[bytes]) -> None:
                if reader is not None and reader.transport is not None:
                    reader.transport.stopProducing()

            done: Deferred[bytes] = Deferred(abort)
            reader = _CappedBody(done)
            response.deliverBody(reader)
            return done.addCallback(lambda text: (response.code, text))

        return sent.addCallback(read).addTimeout(RESPONSE_TIMEOUT, self.reactor)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


# --- the loop ---------------------------------------------------------------------------------


class Sender:
    """One webhook: its cursor and its in-order delivery loop (reactor thread)."""

    def __init__(self, hook: Hook, events: EventLog, run: Callable[..., Deferred[Any]], reactor: Any,
                 post: Callable[[str, dict[str, str], bytes], Deferred[tuple[int, bytes]]] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.hook = hook
        self.events = events
        self.run = run  # blocking work off the reactor (the disk threads)
        self.reactor = reactor
        self.rand = rand
        self._own_poster = post is None
        self.poster = Poster(reactor, hook.ca_pem) if post is None else None
        self._post = post if post is not None else self.poster.post  # type: ignore[union-attr]
        self.path = events.folder / f"webhook-{hook.key}.cursor"
        self.cursor: str | None = None  # the last event passed (posted and answered 2xx, or not for this webhook)
        self.saved: str | None = None
        self.failures = 0
        self.stopped = False
        self._dirty = True
        self._running = False
        self._request: Deferred[Any] | None = None  # cancelled by stop
        self._pause: Deferred[Any] | None = None  # before a retry: cancelled by stop and by reconfigure

    # -- life

    def start(self) -> Deferred[None]:
        return self.run(self._load_cursor).addCallback(self._loaded).addErrback(
            lambda failure: log.failure("webhook {url}: cannot read its cursor {path}", failure,
                                        url=self.hook.config.url, path=str(self.path)))

    def _load_cursor(self) -> tuple[str, bool]:
        try:
            return str(json.loads(self.path.read_bytes())["after"]), True
        except FileNotFoundError:
            # A new webhook starts with what happens from now on, not the log's whole past.
            after = self.events.last_id()
            self._write_cursor(after)
            return after, True

    def _loaded(self, found: tuple[str, bool]) -> None:
        self.cursor = self.saved = found[0]
        self.nudge()

    def stop(self) -> Deferred[None]:
        self.stopped = True
        for waiting in (self._request, self._pause):
            if waiting is not None:
                waiting.cancel()
        return self.poster.close() if self.poster is not None else succeed(None)

    def reconfigure(self, hook: Hook) -> None:
        """New settings for the same webhook: the next request uses them, and a pause ends now."""
        if hook.ca_pem != self.hook.ca_pem and self._own_poster:
            old, self.poster = self.poster, Poster(self.reactor, hook.ca_pem)
            self._post = self.poster.post
            if old is not None:
                old.close()
        self.hook = hook
        self.failures = 0
        if self._pause is not None:
            self._pause.cancel()  # try again at once, with the new settings
        self.nudge()

    def nudge(self) -> None:
        """Something may have been appended to the log."""
        self._dirty = True
        if not self._running and not self.stopped and self.cursor is not None:
            self._running = True
            self._loop().addErrback(self._crashed)

    def _crashed(self, failure: Any) -> None:
        log.failure("webhook {url}: sender failed; trying again at the next event", failure, url=self.hook.config.url)
        self._running = False

    # -- the loop

    @inlineCallbacks
    def _loop(self):
        try:
            while self._dirty and not self.stopped:
                self._dirty = False
                batch = yield self.run(self._read, self.cursor)
                for event in batch:
                    body = payload(event, self.hook.config)
                    if body is not None and not (yield self._deliver(event, body)):
                        return  # stopped
                    self.cursor = str(event["id"])
                    if body is not None:
                        yield self._save()
                if len(batch) == BATCH:
                    self._dirty = True
            if self.cursor != self.saved and not self.stopped:
                yield self._save()  # past events this webhook does not take
        finally:
            self._running = False

    def _read(self, after: str) -> list[dict[str, Any]]:
        found = []
        for event in self.events.read(after):
            found.append(event)
            if len(found) == BATCH:
                break
        return found

    def _save(self) -> Deferred[None]:
        cursor = self.cursor
        assert cursor is not None

        def saved(_: object) -> None:
            self.saved = cursor
        return self.run(self._write_cursor, cursor).addCallback(saved)

    def _write_cursor(self, after: str) -> None:
        data = json.dumps({"url": self.hook.config.url, "after": after}).encode("utf-8") + b"\n"
        make_dirs(self.path.parent, 0o700, self.events.owner)
        write_file_atomically(self.path, data, owner=self.events.owner)

    @inlineCallbacks
    def _deliver(self, event: dict[str, Any], body: bytes):
        """Post until the receiver takes it (True), or gives up on it for good (True), or we stop (False)."""
        url = self.hook.config.url
        refused = 0
        while not self.stopped:
            try:
                self._request = self._post(url, self.hook.headers(event, body, time.time()), body)
                code, text = yield self._request
                problem = f"answered {code}: {text[:200].decode('utf-8', 'replace')!r}"
            except CancelledError:
                if self.stopped:
                    return False
                code, problem = 0, "cancelled"
            except TimeoutError:
                code, problem = 0, f"no answer within {RESPONSE_TIMEOUT:g}s"
            except Exception as e:
                reasons = getattr(e, "reasons", None)  # twisted.web's ResponseFailed and friends
                code, problem = 0, str(reasons[0].value) if reasons else (str(e) or type(e).__name__)
            finally:
                self._request = None
            if 200 <= code < 300:
                if self.failures:
                    log.info("webhook {url}: delivering again after {n} failed tries", url=url, n=self.failures)
                self.failures = 0
                return True
            if code in REFUSED:
                refused += 1
                if refused >= REFUSED_TRIES:
                    log.error("webhook {url}: event {id} ({kind}) refused {n} times ({problem}); skipped",
                              url=url, id=event.get("id"), kind=event.get("event"), n=refused, problem=problem)
                    self.failures = 0
                    return True
            self.failures += 1
            delay = backoff(self.failures, self.rand)
            log.warn("webhook {url}: event {id} not delivered ({problem}); retry {n} in {delay:.0f}s",
                     url=url, id=event.get("id"), problem=problem, n=self.failures, delay=delay)
            self._pause = deferLater(self.reactor, delay, lambda: None)
            try:
                yield self._pause
            except CancelledError:
                if self.stopped:
                    return False
            finally:
                self._pause = None
        return False


class WebhookService(service.MultiService):
    """Every webhook's sender, the one-stat-a-second watch on the log, and its trimming."""

    def __init__(self, events: EventLog, hooks: list[Hook], run: Callable[..., Deferred[Any]], reactor: Any,
                 poll: float = POLL_SECONDS, trim_every: float = TRIM_SECONDS,
                 make_sender: Callable[[Hook], Sender] | None = None) -> None:
        super().__init__()
        self.events = events
        self.run = run
        self.reactor = reactor
        self.hooks = hooks
        self.senders: dict[str, Sender] = {}
        self._make_sender = make_sender or (lambda hook: Sender(hook, events, run, reactor))
        self._seen: tuple[int, int, int] | None = None
        for seconds, call in ((poll, self.poll), (trim_every, self.trim)):
            timer = TimerService(seconds, call)
            timer.clock = reactor
            timer.setServiceParent(self)

    def startService(self) -> None:
        for hook in self.hooks:
            self._add(hook)
        super().startService()

    def stopService(self) -> Deferred[Any]:
        senders, self.senders = list(self.senders.values()), {}
        for sender in senders:
            sender.stop()
        return super().stopService()

    def _add(self, hook: Hook) -> None:
        sender = self._make_sender(hook)
        self.senders[hook.key] = sender
        sender.start()

    def reconfigure(self, hooks: list[Hook]) -> None:
        """The webhooks of a reloaded configuration: new ones start, removed ones stop (their
        cursor stays on disk), the others take their new settings without losing their place."""
        self.hooks = hooks
        if not self.running:
            return
        wanted = {hook.key: hook for hook in hooks}
        for key in [k for k in self.senders if k not in wanted]:
            self.senders.pop(key).stop()
        for key, hook in wanted.items():
            if key in self.senders:
                self.senders[key].reconfigure(hook)
            else:
                self._add(hook)

    def poll(self) -> None:
        """One stat of the open segment: when it changed, every sender looks."""
        seen = self.events.changed()
        if seen != self._seen:
            self._seen = seen
            for sender in self.senders.values():
                sender.nudge()

    def trim(self) -> Deferred[None]:
        cursors = [sender.cursor for sender in self.senders.values()]
        if any(cursor is None for cursor in cursors):
            return succeed(None)  # a cursor not read yet: nothing can be said to be passed
        passed = min(cursors, default=None)  # type: ignore[type-var]

        def trimmed(result: Any) -> None:
            if result.unread:
                log.error("event log over its size cap: removed {names} before every webhook had them",
                          names=", ".join(result.unread))
            elif result.removed:
                log.info("event log: removed {count} old segments", count=len(result.removed))

        return self.run(self.events.trim, passed).addCallbacks(
            trimmed, lambda failure: log.failure("cannot trim the event log", failure))
