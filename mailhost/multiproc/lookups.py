"""A worker's routes and DNS records, answered by the main process.

Every process delivers its own shard of the queue, and the shards of a campaign go
to the same domains: each process asking DNS itself asks every question once per
process (an MX and an _mta-sts TXT query a domain, ~1 ms of CPU each in dnspython).
A worker's Router asks the main process first (WorkerLookups is its `upstream`);
the main process answers from its own Router (the answers it keeps, one lookup of a
name under way at a time, its DNS threads), over the socket pair it already has with
the worker (MainChannel). A worker whose main process cannot answer looks up itself.

Routes and records cross as JSON in one AMP value: an answer too big for one (65,535
bytes) or a route to smart hosts (it carries their settings) is sent as "", which
tells the worker to look it up itself.
"""

from __future__ import annotations

import json
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet.defer import Deferred
from twisted.protocols import amp

from mailhost.delivery.routing import Hop, Records, Route, RouteError, Router
from mailhost.multiproc.commands import AMP_VALUE_MAX, RecordsLookup, RouteLookup


class LookupFailed(dns.exception.DNSException):
    """The main process's lookup failed (SERVFAIL, timeout, ...): its text, for the log and the DSN."""


def route_to_json(route: Route, keep: float) -> str:
    """The route's hops and how many seconds it may be kept; "" for smart hosts."""
    if any(hop.smarthost is not None for hop in route.hops):
        return ""
    hops = [[hop.host, list(hop.addresses), hop.port, hop.preference, hop.secure] for hop in route.hops]
    return json.dumps({"hops": hops, "keep": keep})


def route_error_to_json(error: RouteError) -> str:
    return json.dumps({"error": [error.permanent, error.status, error.text]})


def route_from_json(text: str) -> tuple[Route, float] | None:
    """The route and its seconds to keep; raises the RouteError sent; None for ""."""
    if not text:
        return None
    answer = json.loads(text)
    if "error" in answer:
        permanent, status, text = answer["error"]
        raise RouteError(bool(permanent), str(status), str(text))
    hops = tuple(Hop(str(host), tuple(addresses), int(port), preference, secure=bool(secure))
                 for host, addresses, port, preference, secure in answer["hops"])
    return Route(hops), float(answer["keep"])


def records_to_json(records: Records, rdtype: str) -> str:
    return json.dumps({"texts": list(records.texts), "secure": records.secure, "type": rdtype.upper(),
                       "rdatas": [rdata.to_text() for rdata in records.rdatas], "ttl": records.ttl})


def records_error_to_json(error: Exception) -> str:
    kind = "value" if isinstance(error, ValueError) else "dns"
    return json.dumps({kind: str(error) or error.__class__.__name__})


def records_from_json(text: str) -> Records | None:
    """The records sent; raises LookupFailed or ValueError as the main process's lookup did; None for ""."""
    if not text:
        return None
    answer = json.loads(text)
    if "dns" in answer:
        raise LookupFailed(answer["dns"])
    if "value" in answer:
        raise ValueError(answer["value"])
    rdtype = dns.rdatatype.from_text(answer["type"])
    rdatas = tuple(dns.rdata.from_text(dns.rdataclass.IN, rdtype, each) for each in answer["rdatas"])
    return Records(tuple(answer["texts"]), bool(answer["secure"]), rdatas, float(answer["ttl"]))


def _fits(text: str) -> str:
    return text if len(text.encode("utf-8")) <= AMP_VALUE_MAX else ""


class MainChannel(amp.AMP):
    """The main process's end of a worker's socket pair: it asks the worker (WorkerStart,
    QueueCommand, ...) and answers the worker's lookups with `router`."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router

    @RouteLookup.responder
    def route(self, domain: str) -> Deferred[dict[str, str]]:
        return Deferred.fromCoroutine(self._route(domain))

    async def _route(self, domain: str) -> dict[str, str]:
        try:
            route = await self.router.route(domain)
        except RouteError as e:
            return {"json": _fits(route_error_to_json(e))}
        return {"json": _fits(route_to_json(route, self.router.kept_for(domain)))}

    @RecordsLookup.responder
    def records(self, name: str, rdtype: str) -> Deferred[dict[str, str]]:
        return Deferred.fromCoroutine(self._records(name, rdtype))

    async def _records(self, name: str, rdtype: str) -> dict[str, str]:
        try:
            found = await self.router.records(name, rdtype)
        except (dns.exception.DNSException, ValueError) as e:
            return {"json": _fits(records_error_to_json(e))}
        return {"json": _fits(records_to_json(found, rdtype))}


class WorkerLookups:
    """A worker Router's upstream (mailhost.delivery.routing.Upstream): the main process, through `channel`."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel  # an amp.AMP connected to the main process's MainChannel

    # The answer is read in a coroutine of our own: a RouteError raised in a callback on
    # callRemote's Deferred would reach AMP's unhandledError, which drops the connection.
    def route(self, domain: str) -> Deferred[tuple[Route, float] | None]:
        return Deferred.fromCoroutine(self._route(domain))

    async def _route(self, domain: str) -> tuple[Route, float] | None:
        answer = await self.channel.callRemote(RouteLookup, domain=domain)
        return route_from_json(answer["json"])

    def records(self, name: str, rdtype: str) -> Deferred[Records | None]:
        return Deferred.fromCoroutine(self._records(name, rdtype))

    async def _records(self, name: str, rdtype: str) -> Records | None:
        answer = await self.channel.callRemote(RecordsLookup, name=name, rdtype=rdtype)
        return records_from_json(answer["json"])
