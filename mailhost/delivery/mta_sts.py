"""MTA-STS (RFC 8461): the policy a recipient domain publishes for mail sent to it.

The parser (`parse_sts_record`, `parse_policy`, `mx_matches`) knows nothing of the
network: the HTTPS server that publishes our own policy may use it to check what it
serves. `PolicyStore` keeps fetched policies in state_dir/mta-sts/ for their
max_age, so they outlive a restart; `MtaSts` decides which policy applies to a
domain now (RFC 8461 5.1):

- `_mta-sts.DOMAIN` TXT names the current policy id; no valid record and no
  cached policy: no policy;
- a cached, unexpired policy with that id is used as it is (no fetch);
- otherwise the policy is fetched from https://mta-sts.DOMAIN/.well-known/mta-sts.txt
  (verified TLS for that name, no redirects (3.3), 64 KiB, a short timeout);
- a failed fetch (or DNS failure) with a cached unexpired policy uses the cache
  (5.1); without one the domain has no policy, and the failure is reported
  (TLS-RPT sts-policy-fetch-error / sts-webpki-invalid / sts-policy-invalid).

Several delivering processes (server.workers) share the folder: each fetches on its
own miss and replaces the file atomically (rename), so a reader sees a whole policy
or the previous one, and no lock is needed; at worst two processes fetch once each.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailhost.ops.durable import write_file_atomically

log = Logger(namespace="mailhost.mta-sts")

POLICY_MAX_BYTES = 64 * 1024  # RFC 8461 3.3: "senders SHOULD impose a limit (e.g. 64 KiB)"
FETCH_TIMEOUT = 20.0  # seconds for the whole fetch (3.3 suggests one minute at most)
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: max_age is at most one year
TXT_RECHECK_SECONDS = 60.0  # how long one TXT answer is trusted per process before asking again
MAX_MX_PATTERNS = 100  # a policy listing more is treated as invalid (bounded memory)
MEMORY_DOMAINS = 10000  # policies kept in memory per process

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
_DOMAIN_FILE = re.compile(rf"{_LABEL}(\.{_LABEL})+")


class PolicyError(ValueError):
    """A policy text or TXT record that is not valid."""


@dataclass(frozen=True)
class Policy:
    """One domain's policy as fetched (RFC 8461 3.2)."""

    domain: str
    id: str  # the TXT record's id when it was fetched
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # host patterns, "*.example.net" matches one leftmost label
    max_age: int  # seconds
    fetched: float  # time.time() of the fetch
    text: str  # the policy as served, for TLS-RPT's policy-string

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def allows(self, host: str) -> bool:
        """Is `host` an MX this policy lists (RFC 8461 4.1)?"""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]


@dataclass(frozen=True)
class PolicyResult:
    """What applies to a domain now: a policy or none, and what went wrong finding it."""

    policy: Policy | None
    failure: str = ""  # TLS-RPT result type (RFC 8460 4.3), "" when all went well
    detail: str = ""


def parse_sts_record(strings: list[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT RRset (each record's strings joined), or None.

    RFC 8461 3.1: records not starting with "v=STSv1" are ignored; anything other than
    exactly one remaining, valid record means the domain has no policy."""
    records = [text for text in strings if text.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    found: dict[str, str] = {}
    for field in records[0].split(";"):
        key, equals, value = field.strip().partition("=")
        if not key:
            continue
        if not equals:
            return None
        found.setdefault(key, value)
    if found.get("v") != "STSv1" or not _ID.fullmatch(found.get("id", "")):
        return None
    return found["id"]


def parse_policy(text: str, domain: str = "", policy_id: str = "", fetched: float = 0.0) -> Policy:
    """The policy file (RFC 8461 3.2): `key: value` lines, CRLF or LF; unknown keys ignored."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line {line[:60]!r} is not key: value")
        key, value = key.strip(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _HOST.fullmatch(pattern):
                raise PolicyError(f"mx {value[:80]!r} is not a host name or *.domain pattern")
            if len(mx) >= MAX_MX_PATTERNS:
                raise PolicyError(f"more than {MAX_MX_PATTERNS} mx lines")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)  # the first of a repeated key counts
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age[:20]!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyError("no mx line")
    return Policy(domain, policy_id, mode, tuple(mx), int(age), fetched, text)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact (case-insensitive) or "*." for exactly the leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


class PolicyStore:
    """Fetched policies on disk, one JSON file per domain (blocking: call it in a thread)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, domain: str) -> Path | None:
        domain = domain.lower()
        # Only ordinary A-label names become file names: no "../", no separators.
        return self.folder / f"{domain}.json" if _DOMAIN_FILE.fullmatch(domain) else None

    def load(self, domain: str) -> Policy | None:
        domain = domain.lower()
        path = self._path(domain)
        if path is None:
            return None
        try:
            data = json.loads(path.read_bytes()[:POLICY_MAX_BYTES * 2])
            policy = parse_policy(data["text"], domain, str(data["id"]), float(data["fetched"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or damaged: fetched again
        return policy if policy.expires > time.time() else None

    def save(self, policy: Policy) -> None:
        path = self._path(policy.domain)
        if path is None:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"id": policy.id, "fetched": policy.fetched, "text": policy.text}
        write_file_atomically(path, json.dumps(data).encode("utf-8"))

    def forget_expired(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name.endswith(".json") and self.load(name[:-5]) is None:
                (self.folder / name).unlink(missing_ok=True)


class FetchError(Exception):
    def __init__(self, failure: str, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure  # TLS-RPT result type
        self.detail = detail


def trust_root(ca_file: Path | None) -> Any:
    """The CAs verified TLS trusts: the certificates in ca_file, else the system's."""
    if ca_file is None:
        return ssl.platformTrust()
    pem = ca_file.read_bytes()
    end = b"-----END CERTIFICATE-----"
    blocks = [block + end for block in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in block]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in blocks])


@implementer(IAgentEndpointFactory)
class _ToAddress:
    """Connects the Agent to an address found through relay.nameservers (not the system's
    resolver), with TLS verified against the URL's host name."""

    def __init__(self, reactor: Any, address: str, port: int, host: str, trust: Any) -> None:
        self._reactor, self._address, self._port, self._host, self._trust = reactor, address, port, host, trust

    def endpointForURI(self, uri: Any) -> Any:
        kind = TCP6ClientEndpoint if ":" in self._address else TCP4ClientEndpoint
        tcp = kind(self._reactor, self._address, self._port, timeout=FETCH_TIMEOUT)
        return wrapClientTLS(ssl.optionsForClientTLS(self._host, self._trust), tcp)


class _Body(Protocol):
    """Collects a response body up to POLICY_MAX_BYTES; more aborts the connection."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self._done = done
        self._data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > POLICY_MAX_BYTES and not self._done.called:
            self._done.errback(FetchError("sts-policy-invalid", f"policy larger than {POLICY_MAX_BYTES} bytes"))
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone):
            self._done.callback(bytes(self._data))
        else:
            self._done.errback(FetchError("sts-policy-fetch-error", f"policy body cut short: {reason.getErrorMessage()}"))


def _discard(response: Any) -> None:
    """Read and drop the body of a response we do not use (bounded as any body)."""
    ignored: Deferred[bytes] = Deferred()
    ignored.addErrback(lambda failure: None)
    response.deliverBody(_Body(ignored))


def _is_tls_failure(error: BaseException) -> bool:
    """Did the connection fail in TLS (the certificate, the handshake)? The Agent wraps the
    cause in ResponseNeverReceived / RequestTransmissionFailed, whose `reasons` list it."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    causes = [error, *(reason.value for reason in getattr(error, "reasons", []) if isinstance(reason, Failure))]
    return any(isinstance(cause, (SSL.Error, VerificationError)) for cause in causes)


class MtaSts:
    """Which MTA-STS policy applies to a domain now; `policy()` never blocks the reactor."""

    def __init__(self, store: PolicyStore, dns: Any, reactor: Any, ca_file: Path | None = None, port: int = 443) -> None:
        self.store = store
        self._dns = dns  # delivery.routing.Router: txt() and addresses() through relay.nameservers
        self._reactor = reactor
        self._ca_file = ca_file
        self._trust: Any = None
        self._port = port
        self._memory: dict[str, tuple[float, PolicyResult]] = {}  # domain -> (TXT checked at, result)
        self._pending: dict[str, list[Deferred[PolicyResult]]] = {}

    def configure(self, ca_file: Path | None, port: int) -> None:
        """New relay.ca_file / relay.mta_sts_port (SIGHUP): used by the next fetch."""
        self._ca_file, self._port, self._trust = ca_file, port, None

    def policy(self, domain: str) -> Deferred[PolicyResult]:
        try:
            domain = domain.lower().encode("idna").decode("ascii")  # the A-labels name the policy host
        except UnicodeError:
            return defer.succeed(PolicyResult(None))
        known = self._memory.get(domain)
        now = time.time()
        if known is not None and known[0] + TXT_RECHECK_SECONDS > now and (
                known[1].policy is None or known[1].policy.expires > now):
            return defer.succeed(known[1])
        waiter: Deferred[PolicyResult] = Deferred()
        if domain in self._pending:  # one lookup per domain at a time; the others wait for it
            self._pending[domain].append(waiter)
            return waiter
        self._pending[domain] = [waiter]

        def settle(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("MTA-STS policy of {domain}", result, domain=domain)
                result = PolicyResult(None, "sts-policy-fetch-error", result.getErrorMessage())
            if len(self._memory) >= MEMORY_DOMAINS:
                self._memory.clear()
            self._memory[domain] = (time.time(), result)
            for each in self._pending.pop(domain, []):
                each.callback(result)

        Deferred.fromCoroutine(self._find(domain)).addBoth(settle)
        return waiter

    async def _find(self, domain: str) -> PolicyResult:
        known = self._memory.get(domain)
        cached = known[1].policy if known is not None else None
        if cached is None or cached.expires <= time.time():
            cached = await deferToThread(self.store.load, domain)
        try:
            strings = await self._dns.txt(f"_mta-sts.{domain}")
        except Exception as e:  # DNS failed: a cached policy still holds (RFC 8461 5.1)
            if cached is not None:
                return PolicyResult(cached)
            return PolicyResult(None, "sts-policy-fetch-error", f"_mta-sts.{domain} TXT lookup failed: {e}")
        policy_id = parse_sts_record(strings)
        if policy_id is None:
            # No (valid) record: a cached policy applies until it expires (5.1).
            return PolicyResult(cached)
        if cached is not None and cached.id == policy_id:
            return PolicyResult(cached)
        try:
            text = await self._fetch(domain)
            policy = parse_policy(text, domain, policy_id, time.time())
        except FetchError as e:
            return self._failed(domain, cached, e.failure, e.detail)
        except PolicyError as e:
            return self._failed(domain, cached, "sts-policy-invalid", f"policy of {domain}: {e}")
        await deferToThread(self.store.save, policy)
        log.info("MTA-STS policy of {domain}: id={id} mode={mode} mx={mx} max_age={age}", domain=domain, id=policy.id,
                 mode=policy.mode, mx=",".join(policy.mx), age=policy.max_age)
        return PolicyResult(policy)

    def _failed(self, domain: str, cached: Policy | None, failure: str, detail: str) -> PolicyResult:
        log.warn("MTA-STS policy of {domain} not fetched ({failure}: {detail}){cache}", domain=domain, failure=failure,
                 detail=detail, cache="; the cached one still applies" if cached is not None else "")
        return PolicyResult(cached, failure, detail)

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            addresses = await self._dns.addresses(host)
        except Exception as e:
            raise FetchError("sts-policy-fetch-error", f"{host}: {e}") from None
        if not addresses:
            raise FetchError("sts-policy-fetch-error", f"{host} has no address")
        if self._trust is None:
            self._trust = trust_root(self._ca_file)
        agent = Agent.usingEndpointFactory(self._reactor, _ToAddress(self._reactor, addresses[0], self._port, host,
                                                                     self._trust))
        url = f"https://{host}/.well-known/mta-sts.txt".encode("ascii")
        request = agent.request(b"GET", url)
        request.addTimeout(FETCH_TIMEOUT, self._reactor)
        try:
            response = await request
        except Exception as e:
            if _is_tls_failure(e):
                raise FetchError("sts-webpki-invalid", f"https://{host}/: TLS: {e}") from None
            raise FetchError("sts-policy-fetch-error", f"https://{host}/: {e}") from None
        if response.code != 200:  # 3.3: redirects are not followed; anything but 200 is a failure
            _discard(response)
            raise FetchError("sts-policy-fetch-error", f"https://{host}/.well-known/mta-sts.txt: HTTP {response.code}")
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if kind != b"text/plain":
            _discard(response)
            raise FetchError("sts-policy-invalid", f"policy of {domain} is {kind.decode('latin-1')!r}, not text/plain")
        done: Deferred[bytes] = Deferred()
        done.addTimeout(FETCH_TIMEOUT, self._reactor)
        response.deliverBody(_Body(done))
        try:
            body = await done
        except FetchError:
            raise
        except Exception as e:
            raise FetchError("sts-policy-fetch-error", f"policy of {domain}: {e}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError("sts-policy-invalid", f"policy of {domain} is not UTF-8") from None
