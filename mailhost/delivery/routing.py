"""Routing: where mail for a remote domain goes.

`Router.route(domain)` answers with a `Route`: the hops to try in order, each a
host name with every address it has (AAAA first, then A) and a port. With smart
hosts configured every remote domain goes to them, in config order. Otherwise
the domain's MX records decide (RFC 5321 5.1), looked up with dnspython on a
small dedicated thread pool so that the reactor never waits on DNS:

- MX hosts in preference order; equal preferences in random order (load
  spreading, as RFC 5321 5.1 asks).
- No MX record: the domain itself is the one host (implicit MX, preference None).
- Null MX (RFC 7505, a lone MX whose exchange is "."): permanent 5.1.10.
- The domain does not exist (NXDOMAIN): permanent 5.1.2.
- SERVFAIL, timeout, no usable name server: transient 4.4.3 (retry later).
- MX hosts that all have no address: what Postfix does. If any of their lookups
  failed temporarily: transient 4.4.3 (the next attempt may find them). If
  every one of them is NXDOMAIN or has no A/AAAA record: permanent 5.4.4
  ("Host or domain name not found"; nothing will change by retrying soon, and
  the queue lifetime would only delay the bounce by days).
- Smart hosts that all fail to resolve: transient 4.4.3 whatever the DNS said.
  That is the operator's configuration, not the recipient's address; the mail
  waits in the queue until it is fixed (or its lifetime ends).
- Address literals ("[192.0.2.1]"), and names that are not valid domain
  names: permanent 5.1.2. mailhost never routes to address literals.
- Loops (RFC 5321 5.1): an MX host whose name is our hostname, or one of whose
  (address, port) pairs is one we listen on, is dropped together with every MX
  of the same or a higher preference value. If nothing is left because we are
  the best MX: permanent 5.4.6 "mail for X loops back to myself". The same
  goes for the implicit MX and for smart hosts (those are dropped one by one).
  A wildcard listening address (0.0.0.0, ::, "") matches every address of this
  machine (any address a socket can bind to, which includes all of
  127.0.0.0/8) on that port; "::" covers IPv4 too (dual stack, as Linux
  listens by default). A listening address given as a host name counts as
  the addresses it resolves to when the Router is made.
- Internationalised domains are looked up by their A-labels (IDNA 2008, UTS 46).

Answers are kept on the reactor thread (routes ROUTE_CACHE_SECONDS, records for their
TTL up to that), and one lookup of a name is under way at a time: who asks meanwhile
waits for its answer. A worker process's Router asks the main process's first (its
`upstream`, mailhost.multiproc.lookups), so that two processes delivering to the same
domains ask DNS once, not once each; it looks up itself when the main process cannot answer.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailhost.config import RelayConfig, SmartHostConfig

T = TypeVar("T")

log = Logger(namespace="mailhost.routing")

IDNA = dns.name.IDNA_2008_Practical if dns.name.have_idna_2008 else dns.name.IDNA_2003

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Hop:
    """One host to try: its name, all its addresses, the port to use."""

    host: str  # MX host name or smart host name (A-labels), for logs, TLS SNI/verification
    addresses: tuple[str, ...]  # every AAAA then every A address, without duplicates
    port: int
    preference: int | None  # MX preference; None for the implicit MX and smart hosts
    smarthost: SmartHostConfig | None = None  # set when this hop is a configured smart host
    # DNSSEC (relay.dane): the MX RRset and this host's address records were all authenticated
    # by the validating resolver (its AD bit), so its TLSA records may be looked up (RFC 7672 2.2).
    secure: bool = False


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]  # in the order to try them; never empty


class RouteError(Exception):
    """No route for a domain: bounce now (permanent) or try again later."""

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(permanent, status, text)
        self.permanent = permanent
        self.status = status  # enhanced status code, e.g. "5.1.2"
        self.text = text  # for the DSN diagnostic and the log

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


@dataclass(frozen=True)
class _Lookup:
    """What a host's A/AAAA lookups found."""

    addresses: tuple[str, ...]
    transient: bool = False  # some lookup failed in a way that may pass
    nxdomain: bool = False  # the name does not exist
    reason: str = ""  # why there is no address, when there is none
    secure: bool = False  # every answer found carried the AD bit


@dataclass(frozen=True)
class Records:
    """An answer for `Router.records()`: the records (presentation text), none for
    NXDOMAIN or no data, and whether the validating resolver authenticated the answer."""

    texts: tuple[str, ...]
    secure: bool
    rdatas: tuple[Any, ...] = ()
    ttl: float = 0.0  # how long the answer may be reused, in seconds (RFC 2308 for a denial)


class Upstream(Protocol):
    """Another process's Router, asked first (mailhost.multiproc.lookups). Its RouteError,
    DNSException and ValueError are answers; None, or any other failure: look up ourselves."""

    def route(self, domain: str) -> Deferred[tuple[Route, float] | None]:
        """The route and how many seconds it may be kept."""

    def records(self, name: str, rdtype: str) -> Deferred[Records | None]:
        """As Router.records."""


def _authenticated(response: Any) -> bool:
    """The AD bit of a resolver's answer (RFC 4035 3.2.3): trusted as Postfix trusts it, so
    relay.nameservers must be a validating resolver on a path we trust (loopback)."""
    return response is not None and bool(response.flags & dns.flags.AD)


def _denial_ttl(response: Any) -> float:
    """How long a denial (NXDOMAIN, no data) may be kept: the SOA's TTL capped by its
    MINIMUM field (RFC 2308 5); 0 without an SOA in the authority section."""
    for rrset in getattr(response, "authority", ()):
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


_TYPE_NAMES = {dns.rdatatype.MX: "MX", dns.rdatatype.A: "A", dns.rdatatype.AAAA: "AAAA"}


def _dns_reason(error: dns.exception.DNSException, name: dns.name.Name, rdtype: int) -> str:
    """Postfix-style text for a failed lookup."""
    where = f"Name service error for name={name.to_text(omit_final_dot=True)} type={_TYPE_NAMES[rdtype]}"
    if isinstance(error, dns.resolver.NXDOMAIN):
        what = "Host not found"
    elif isinstance(error, dns.resolver.NoAnswer):
        what = "Host found but no data record of requested type"
    elif isinstance(error, dns.exception.Timeout):
        what = "Host not found, try again (timeout)"
    elif isinstance(error, dns.resolver.NoNameservers):
        what = "Host not found, try again (no name server answered; SERVFAIL or refused)"
    else:
        what = f"Host not found, try again ({error.__class__.__name__}: {error})"
    return f"Host or domain name not found. {where}: {what}"


def _ip(text: str) -> _IP | None:
    """The IP address `text` names ("[::1]" too), IPv4-mapped IPv6 as IPv4; None if not one."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_local(address: _IP) -> bool:
    """Is `address` one of this machine's? (A socket can bind to it only then.)"""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


class Router:
    """Routing decisions for remote domains; `route()` never blocks the reactor."""

    THREADS = 8

    def __init__(
        self,
        relay: RelayConfig,
        our_hostname: str,
        our_addresses: Iterable[tuple[str, int]] = frozenset(),
        resolver: dns.resolver.Resolver | None = None,
        timeout: float = 10.0,
        reactor: Any = None,
    ) -> None:
        self._timeout = timeout
        self.configure(relay, our_hostname, our_addresses, resolver)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._stopping = False
        self.upstream: Upstream | None = None  # a worker's: the main process's Router
        self._upstream_down = False  # said once in the log, until it answers again
        self._upstream_skipped_until = 0.0  # after it failed us: not asked until then (reactor.seconds())
        self._pending: dict[tuple[str, ...], list[Deferred[Any]]] = {}  # lookups under way -> who waits

    def configure(self, relay: RelayConfig, our_hostname: str, our_addresses: Iterable[tuple[str, int]] = frozenset(),
                  resolver: dns.resolver.Resolver | None = None) -> None:
        """Take (new) [relay] settings, host name and listening addresses; forget the routes
        found so far. The DNS threads are kept (SIGHUP calls this; lookups under way finish)."""
        self._relay = relay
        try:
            self._our_name: dns.name.Name | None = self._name(our_hostname)
        except ValueError:
            self._our_name = None
        self._our_exact: set[tuple[_IP, int]] = set()
        self._our_wildcards: dict[int, set[int]] = {}  # port -> IP versions it covers
        for address, port in our_addresses:
            ip = _ip(address)
            if address in ("", "*") or (ip is not None and ip.is_unspecified):
                covers = (4, 6) if ip is not None and ip.version == 6 else (4,)
                self._our_wildcards.setdefault(port, set()).update(covers)
                continue
            if ip is not None:
                self._our_exact.add((ip, port))
                continue
            # A listener given a host name ("localhost") binds to what it resolves to.
            try:
                infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue  # such a listener could not have started either
            for info in infos:
                resolved = _ip(str(info[4][0]).partition("%")[0])
                if resolved is not None:
                    self._our_exact.add((resolved, port))
        # A resolver given is used as it is (its own timeout and lifetime).
        self._resolver = resolver if resolver is not None else self._make_resolver()
        self._routes: dict[str, tuple[float, Route]] = {}  # domain -> (expires, route)
        self._answers: dict[tuple[str, str], tuple[float, Records]] = {}  # (name, type) -> (expires, records)

    def _make_resolver(self) -> dns.resolver.Resolver:
        if self._relay.nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in self._relay.nameservers]
        else:
            try:
                resolver = dns.resolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.resolver.Resolver(configure=False)  # no servers: every lookup is 4.4.3
        resolver.lifetime = self._timeout
        resolver.timeout = min(resolver.timeout, self._timeout)
        if self._relay.dane:
            # Ask for DNSSEC (DO) and for the resolver's verdict (AD, RFC 6840 5.7).
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        # Answers are kept for their TTL: a campaign to one domain asks DNS once, not per message.
        resolver.cache = dns.resolver.Cache()
        return resolver

    # -- the thread pool -------------------------------------------------------------------

    def start(self) -> None:
        """Start the DNS threads (`route()` does it when needed)."""
        if self._pool is None:
            self._stopping = False
            self._pool = ThreadPool(minthreads=0, maxthreads=self.THREADS, name="mailhost-dns")
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Stop the DNS threads: waits for the queries under way (each at most `timeout`), but
        the lookups still waiting for a thread, and the further queries of those under way, are
        not made. Stopping used to wait for all of them: with DNS down and a queue of mail to
        many domains, several of `timeout` per domain, one thread per THREADS domains."""
        self._stopping = True  # read by the DNS threads (a bool: no lock needed)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # it is the trigger running now

    @property
    def stopping(self) -> bool:
        """Stopped (or stopping): lookups not yet made are refused with a 4.4.3 RouteError."""
        return self._stopping

    def _in_thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._stopping:  # a lookup after stop() is refused, not a new pool no shutdown would stop
            return defer.fail(RouteError(False, "4.4.3", "not looked up, mailhost is stopping"))
        self.start()
        assert self._pool is not None
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    # -- the decision ----------------------------------------------------------------------

    def route(self, domain: str) -> Deferred[Route]:
        """The route for `domain`; fails with RouteError when there is none.

        A route found in the last ROUTE_CACHE_SECONDS is reused on the reactor
        thread (a campaign to one domain makes one thread trip, not one per
        message), with equal MX preferences shuffled again each time.
        """
        key = domain.lower()
        cached = self._routes.get(key)  # only names that passed the check below are here
        if cached is not None and cached[0] > time.monotonic():
            return defer.succeed(_reshuffled(cached[1]))
        try:
            self._domain(domain)  # refuse literals and bad names without a thread trip
        except RouteError:
            return defer.fail()
        found = self._once(("route", key), lambda: Deferred.fromCoroutine(self._find_route(key, domain)))
        return found.addCallback(_reshuffled)

    def kept_for(self, domain: str) -> float:
        """Seconds the route found for `domain` is still kept (0: none kept)."""
        cached = self._routes.get(domain.lower())
        return max(0.0, cached[0] - time.monotonic()) if cached is not None else 0.0

    async def _find_route(self, key: str, domain: str) -> Route:
        found = None
        # Smart host routes carry the operator's smart host settings: each process finds its own.
        if self.upstream is not None and not self._relay.smarthosts:
            answer = await self._from_upstream(lambda upstream: upstream.route(domain), (RouteError,))
            if answer is not None:
                found = answer[0], min(answer[1], ROUTE_CACHE_SECONDS)
        if found is None:
            found = await self._in_thread(self.resolve, domain), ROUTE_CACHE_SECONDS
        route, keep = found
        _keep(self._routes, key, keep, route)
        return route

    def _once(self, key: tuple[str, ...], lookup: Callable[[], Deferred[T]]) -> Deferred[T]:
        """One lookup of `key` at a time: who asks while it is under way waits for its answer."""
        waiter: Deferred[T] = Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[key] = [waiter]

        def settle(result: T | Failure) -> None:
            for each in self._pending.pop(key, []):
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        lookup().addBoth(settle)
        return waiter

    async def _from_upstream(self, ask: Callable[[Upstream], Deferred[T | None]],
                             answers: tuple[type[Exception], ...]) -> T | None:
        """The main process's answer; None (look up ourselves) when it has none, cannot
        answer within UPSTREAM_SECONDS, or failed us lately. The `answers` failures are its
        answer and are raised."""
        if self.upstream is None or self._reactor.seconds() < self._upstream_skipped_until:
            return None
        try:
            found = await ask(self.upstream).addTimeout(UPSTREAM_SECONDS, self._reactor)
        except answers:
            raise
        except Exception as e:
            self._upstream_unavailable(e)
            return None
        self._upstream_down = False
        return found

    def _upstream_unavailable(self, error: BaseException) -> None:
        # Not asked again for a while: a main process stopped or stuck would make every lookup wait.
        self._upstream_skipped_until = self._reactor.seconds() + UPSTREAM_SKIP_SECONDS
        if not self._upstream_down:
            self._upstream_down = True
            why = f"no answer within {UPSTREAM_SECONDS:g} s" if isinstance(error, defer.TimeoutError) \
                else str(error) or error.__class__.__name__
            log.warn("DNS answers from the main process unavailable ({error}): looking up ourselves", error=why)

    def resolve(self, domain: str) -> Route:
        """The blocking form of `route()`: never call it on the reactor thread."""
        name = self._domain(domain)
        if self._relay.smarthosts:
            return self._smarthost_route(domain)
        return self._mx_route(domain, name)

    def records(self, name: str, rdtype: str) -> Deferred[Records]:
        """The `rdtype` records of `name` (TXT strings joined per record), looked up through
        relay.nameservers off the reactor; none for NXDOMAIN or no data. Fails with the
        resolver's DNSException (SERVFAIL, timeout: try later) or ValueError for a bad name.
        An answer is kept for its TTL, at most ROUTE_CACHE_SECONDS."""
        key = (name.strip().rstrip(".").lower(), rdtype.upper())
        cached = self._answers.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return defer.succeed(cached[1])
        return self._once(("records", *key), lambda: Deferred.fromCoroutine(self._find_records(key, name, rdtype)))

    async def _find_records(self, key: tuple[str, str], name: str, rdtype: str) -> Records:
        found = await self._from_upstream(lambda upstream: upstream.records(name, rdtype),
                                          (dns.exception.DNSException, ValueError))
        if found is None:
            found = await self._in_thread(self._records, name, rdtype)
        _keep(self._answers, key, min(found.ttl, ROUTE_CACHE_SECONDS), found)
        return found

    def _records(self, name: str, rdtype: str) -> Records:
        qname = self._name(name)
        kind = dns.rdatatype.from_text(rdtype)
        try:
            answer = self._query(qname, kind)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as error:
            try:
                response = error.response() if isinstance(error, dns.resolver.NoAnswer) else error.response(qname)
            except (KeyError, IndexError):
                response = None
            return Records((), _authenticated(response), ttl=_denial_ttl(response))
        if kind == dns.rdatatype.TXT:
            texts = tuple(b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer)
        else:
            texts = tuple(rdata.to_text() for rdata in answer)
        return Records(texts, _authenticated(answer.response), tuple(answer),
                       max(0.0, answer.expiration - time.time()))

    def txt(self, name: str) -> Deferred[list[str]]:
        """The TXT records of `name`, each one's strings joined (RFC 7208 3.3 style)."""
        return self.records(name, "TXT").addCallback(lambda found: list(found.texts))

    def addresses(self, name: str) -> Deferred[list[str]]:
        """Every AAAA then A address of host `name` (none when it has none)."""
        return self._in_thread(lambda: list(self._lookup_addresses(self._name(name)).addresses))

    def _domain(self, domain: str) -> dns.name.Name:
        if domain.startswith("[") or _ip(domain) is not None:
            raise RouteError(True, "5.1.2", f"{domain}: mail to address literals is not routed")
        try:
            return self._name(domain)
        except ValueError:
            raise RouteError(True, "5.1.2", f"{domain}: not a valid domain name") from None

    @staticmethod
    def _name(text: str) -> dns.name.Name:
        text = text.strip().rstrip(".")
        if not text:
            raise ValueError("empty name")
        try:
            return dns.name.from_text(text, origin=dns.name.root, idna_codec=IDNA)
        except (dns.exception.DNSException, UnicodeError, ValueError) as error:
            raise ValueError(str(error)) from None

    def _query(self, name: dns.name.Name, rdtype: int) -> dns.resolver.Answer:
        if self._stopping:
            raise RouteError(False, "4.4.3", f"{name.to_text(omit_final_dot=True)}: not looked up, mailhost is stopping")
        return self._resolver.resolve(name, rdtype, search=False)

    def _lookup_addresses(self, name: dns.name.Name) -> _Lookup:
        """Every AAAA and A address of `name`, and why there is none when there is none."""
        addresses: list[str] = []
        reasons: list[str] = []
        transient: list[str] = []
        secure = True
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                answer = self._query(name, rdtype)
            except dns.resolver.NXDOMAIN as error:
                return _Lookup((), nxdomain=True, reason=_dns_reason(error, name, rdtype))
            except dns.resolver.NoAnswer as error:
                reasons.append(_dns_reason(error, name, rdtype))
                secure = secure and _authenticated(error.response())
                continue
            except dns.exception.DNSException as error:
                transient.append(_dns_reason(error, name, rdtype))
                secure = False
                continue
            secure = secure and _authenticated(answer.response)
            for rdata in answer:
                if rdata.address not in addresses:
                    addresses.append(rdata.address)
        if addresses:
            return _Lookup(tuple(addresses), secure=secure)
        if transient:
            return _Lookup((), transient=True, reason=transient[-1])
        return _Lookup((), reason=reasons[-1])  # the A lookup's

    def _is_ours(self, hop: Hop) -> bool:
        for text in hop.addresses:
            ip = _ip(text)
            if ip is None:
                continue
            if (ip, hop.port) in self._our_exact:
                return True
            if ip.version in self._our_wildcards.get(hop.port, ()) and _is_local(ip):
                return True
        return False

    def _loop_error(self, domain: str) -> RouteError:
        return RouteError(True, "5.4.6", f"mail for {domain} loops back to myself")

    def _mx_route(self, domain: str, name: dns.name.Name) -> Route:
        try:
            answer = self._query(name, dns.rdatatype.MX)
        except dns.resolver.NoAnswer as error:
            return self._implicit_mx_route(domain, name, _authenticated(error.response()))
        except dns.resolver.NXDOMAIN as error:
            raise RouteError(True, "5.1.2", _dns_reason(error, name, dns.rdatatype.MX)) from None
        except dns.exception.DNSException as error:
            raise RouteError(False, "4.4.3", _dns_reason(error, name, dns.rdatatype.MX)) from None

        mx_secure = _authenticated(answer.response)
        best: dict[dns.name.Name, int] = {}  # a host listed twice counts at its best preference
        for rdata in answer:
            if rdata.exchange not in best or rdata.preference < best[rdata.exchange]:
                best[rdata.exchange] = rdata.preference
        records = [(preference, exchange) for exchange, preference in best.items() if exchange != dns.name.root]
        if not records:  # RFC 7505: "." as the only exchange
            raise RouteError(True, "5.1.10", f"Recipient address has null MX: {domain} does not accept mail")
        random.shuffle(records)
        records.sort(key=lambda record: record[0])  # stable: equal preferences stay shuffled

        # RFC 5321 5.1: find ourselves, drop that MX and every one not better than it.
        cut = min((p for p, exchange in records if exchange == self._our_name), default=None)
        if cut is not None:
            records = [(p, exchange) for p, exchange in records if p < cut]

        resolved = []
        for preference, exchange in records:
            found = self._lookup_addresses(exchange)
            hop = Hop(exchange.to_text(omit_final_dot=True), found.addresses, self._relay.mx_port, preference,
                      secure=mx_secure and found.secure)
            if found.addresses and self._is_ours(hop):
                cut = preference if cut is None else min(cut, preference)
            resolved.append((hop, found))
        if cut is not None:
            resolved = [(hop, found) for hop, found in resolved if hop.preference < cut]
        if not resolved:  # we are the best MX
            raise self._loop_error(domain)
        hops = tuple(hop for hop, found in resolved if hop.addresses)
        if hops:
            return Route(hops)
        failures = [found for hop, found in resolved]
        transient = [f for f in failures if f.transient]
        if transient:
            raise RouteError(False, "4.4.3", transient[0].reason)
        raise RouteError(True, "5.4.4", failures[0].reason)

    def _implicit_mx_route(self, domain: str, name: dns.name.Name, denial_secure: bool = False) -> Route:
        """RFC 5321 5.1: no MX records, so the domain is its own mail host."""
        if name == self._our_name:
            raise self._loop_error(domain)
        found = self._lookup_addresses(name)
        if not found.addresses:
            if found.transient:
                raise RouteError(False, "4.4.3", found.reason)
            raise RouteError(True, "5.1.2" if found.nxdomain else "5.4.4", found.reason)
        hop = Hop(name.to_text(omit_final_dot=True), found.addresses, self._relay.mx_port, None,
                  secure=denial_secure and found.secure)
        if self._is_ours(hop):
            raise self._loop_error(domain)
        return Route((hop,))

    def _smarthost_route(self, domain: str) -> Route:
        hops = []
        looped = False
        reasons = []
        for smarthost in self._relay.smarthosts:
            literal = _ip(smarthost.host)
            if literal is not None:
                hop = Hop(str(literal), (str(literal),), smarthost.port, None, smarthost)
            else:
                try:
                    name = self._name(smarthost.host)
                except ValueError:
                    reasons.append(f"smart host {smarthost.host!r} is not a valid host name")
                    continue
                if name == self._our_name:
                    looped = True
                    continue
                found = self._lookup_addresses(name)
                if not found.addresses:
                    reasons.append(f"smart host {smarthost.host}: {found.reason}")
                    continue
                hop = Hop(name.to_text(omit_final_dot=True), found.addresses, smarthost.port, None, smarthost)
            if self._is_ours(hop):
                looped = True
                continue
            hops.append(hop)
        if hops:
            return Route(tuple(hops))
        if looped and not reasons:
            raise self._loop_error(domain)
        raise RouteError(False, "4.4.3", "; ".join(reasons) or f"no smart host for {domain}")


ROUTE_CACHE_SECONDS = 30.0
UPSTREAM_SECONDS = 2.0  # a worker waits this long for the main process's answer, then looks up itself
UPSTREAM_SKIP_SECONDS = 30.0  # ... and does not ask it again for this long
ANSWERS_KEPT = 10_000  # routes, and records, kept on the reactor thread; all forgotten when more come


def _keep(kept: dict[Any, tuple[float, Any]], key: Any, seconds: float, value: Any) -> None:
    """Keep `value` under `key` for `seconds` (not at all for 0); at ANSWERS_KEPT entries
    forget them all rather than grow (a campaign to many domains)."""
    if seconds <= 0:
        return
    if len(kept) >= ANSWERS_KEPT:
        kept.clear()
    kept[key] = (time.monotonic() + seconds, value)


def _reshuffled(route: Route) -> Route:
    """The same hops with each run of equal MX preferences in a new random order."""
    hops = list(route.hops)
    start = 0
    while start < len(hops):
        end = start
        while end < len(hops) and hops[end].preference is not None and hops[end].preference == hops[start].preference:
            end += 1
        if end - start > 1:
            group = hops[start:end]
            random.shuffle(group)
            hops[start:end] = group
        start = max(end, start + 1)
    return Route(tuple(hops))
