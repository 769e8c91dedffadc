"""mailhost.multiproc.lookups: a worker's routes and DNS records answered by the main process.

The JSON both ends speak, the two ends talking AMP to each other (twisted.test.iosim),
and a worker's Router with the main process as its upstream: what it takes from it,
what it keeps, and that it looks up itself when the main process cannot answer."""

from __future__ import annotations

import dns.exception
import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import amp
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

from mailhost.config import RelayConfig, SmartHostConfig
from mailhost.delivery.routing import (
    ROUTE_CACHE_SECONDS, UPSTREAM_SECONDS, UPSTREAM_SKIP_SECONDS, Hop, Records, Route, RouteError, Router, _denial_ttl,
)
from mailhost.multiproc.lookups import (
    LookupFailed, MainChannel, WorkerLookups, records_error_to_json, records_from_json, records_to_json,
    route_error_to_json, route_from_json, route_to_json,
)

ROUTE = Route((Hop("mx1.remote.test", ("::1", "127.0.0.11"), 25, 10, secure=True),
               Hop("mx2.remote.test", ("127.0.0.21",), 25, 20)))
TLSA = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA, "3 1 1 " + "ab" * 32)
STS = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, '"v=STSv1; id=20261205;"')


def result(deferred: Deferred):
    """What a fired Deferred holds (its Failure's exception is raised)."""
    box: list = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


# -- the JSON ------------------------------------------------------------------------------

def test_a_route_crosses_with_its_hops_and_how_long_to_keep_it():
    assert route_from_json(route_to_json(ROUTE, 12.5)) == (ROUTE, 12.5)
    implicit = Route((Hop("implicit.test", ("127.0.0.51",), 2526, None),))
    assert route_from_json(route_to_json(implicit, 30.0)) == (implicit, 30.0)


def test_a_route_error_crosses_as_the_same_error():
    with pytest.raises(RouteError) as raised:
        route_from_json(route_error_to_json(RouteError(True, "5.1.10", "Recipient address has null MX")))
    assert (raised.value.permanent, raised.value.status, raised.value.text) == \
        (True, "5.1.10", "Recipient address has null MX")


def test_a_smart_host_route_is_not_sent_the_worker_finds_its_own():
    smarthost = SmartHostConfig(host="relay1.provider.test", port=587, tls="none", username=None, password_file=None)
    route = Route((Hop("relay1.provider.test", ("127.0.0.71",), 587, None, smarthost),))
    assert route_to_json(route, 30.0) == ""
    assert route_from_json("") is None


def test_records_cross_with_rdatas_a_dane_check_can_read():
    sent = Records((TLSA.to_text(),), True, (TLSA,), 300.0)
    got = records_from_json(records_to_json(sent, "tlsa"))
    assert got == sent
    assert (got.rdatas[0].usage, got.rdatas[0].selector, got.rdatas[0].mtype, bytes(got.rdatas[0].cert)) == \
        (3, 1, 1, bytes.fromhex("ab" * 32))
    txt = Records(("v=STSv1; id=20261205;",), False, (STS,), 0.0)
    assert records_from_json(records_to_json(txt, "TXT")) == txt
    assert records_from_json(records_to_json(Records((), False, (), 60.0), "TXT")) == Records((), False, (), 60.0)


def test_a_failed_lookup_crosses_as_a_dns_error_with_its_text():
    with pytest.raises(LookupFailed, match="All nameservers failed"):
        records_from_json(records_error_to_json(dns.exception.DNSException("All nameservers failed")))
    assert issubclass(LookupFailed, dns.exception.DNSException)  # what Router.records' callers catch
    with pytest.raises(ValueError, match="empty name"):
        records_from_json(records_error_to_json(ValueError("empty name")))


def test_a_denial_is_kept_as_long_as_its_soa_says():
    query = dns.message.make_query("nosuch.test", "TXT")
    response = dns.message.make_response(query)
    response.authority.append(dns.rrset.from_text("test.", 3600, "IN", "SOA", "ns.test. host.test. 1 7200 900 1209600 60"))
    assert _denial_ttl(response) == 60.0  # the MINIMUM field caps the SOA's own TTL (RFC 2308 5)
    assert _denial_ttl(dns.message.make_response(query)) == 0.0  # no SOA: not kept


# -- the two ends over AMP ------------------------------------------------------------------

class FakeRouter:
    """The main process's Router: canned answers, and what it was asked."""

    def __init__(self, routes: dict, records: dict | None = None) -> None:
        self.routes = routes
        self.answers = records or {}
        self.asked: list[tuple] = []

    def route(self, domain: str) -> Deferred:
        self.asked.append(("route", domain))
        found = self.routes[domain]
        return fail(found) if isinstance(found, Exception) else succeed(found)

    def kept_for(self, domain: str) -> float:
        return 17.0

    def records(self, name: str, rdtype: str) -> Deferred:
        self.asked.append(("records", name, rdtype))
        found = self.answers[(name, rdtype)]
        return fail(found) if isinstance(found, Exception) else succeed(found)


def channel(router) -> tuple[WorkerLookups, object]:
    """A worker's lookups connected to a MainChannel answering with `router`, and the pump."""
    main = MainChannel(router)
    worker = amp.AMP()
    pump = connect(main, makeFakeServer(main), worker, makeFakeClient(worker))
    return WorkerLookups(worker), pump


def test_the_worker_gets_the_main_processs_route_and_its_errors_over_the_channel():
    router = FakeRouter({"remote.test": ROUTE, "nullmx.test": RouteError(True, "5.1.10", "null MX")})
    lookups, pump = channel(router)
    asked = lookups.route("remote.test")
    pump.flush()
    assert result(asked) == (ROUTE, 17.0)
    refused = lookups.route("nullmx.test")
    pump.flush()
    with pytest.raises(RouteError, match="5.1.10 null MX"):
        result(refused)
    again = lookups.route("remote.test")  # an error is an answer: the channel stays up
    pump.flush()
    assert result(again) == (ROUTE, 17.0)
    assert router.asked == [("route", "remote.test"), ("route", "nullmx.test"), ("route", "remote.test")]


def test_the_worker_gets_the_main_processs_records_and_their_failures_over_the_channel():
    found = Records((TLSA.to_text(),), True, (TLSA,), 300.0)
    router = FakeRouter({}, {("_25._tcp.mx1.remote.test", "TLSA"): found,
                             ("_mta-sts.broken.test", "TXT"): dns.exception.Timeout()})
    lookups, pump = channel(router)
    asked = lookups.records("_25._tcp.mx1.remote.test", "TLSA")
    pump.flush()
    assert result(asked) == found
    failed = lookups.records("_mta-sts.broken.test", "TXT")
    pump.flush()
    with pytest.raises(LookupFailed, match="timed out"):
        result(failed)


def test_an_answer_too_big_for_the_channel_tells_the_worker_to_look_up_itself():
    huge = Records(("x" * 70_000,), False, (), 300.0)  # one AMP value holds 65,535 bytes
    lookups, pump = channel(FakeRouter({}, {("big.test", "TXT"): huge}))
    asked = lookups.records("big.test", "TXT")
    pump.flush()
    assert result(asked) is None


# -- a worker's Router with the main process upstream -------------------------------------

class Upstream:
    """The main process as a worker's Router sees it; `answers` are Deferreds or values."""

    def __init__(self, routes: dict | None = None, records: dict | None = None) -> None:
        self.routes = routes or {}
        self.answers = records or {}
        self.asked: list[tuple] = []

    def route(self, domain: str) -> Deferred:
        self.asked.append(("route", domain))
        found = self.routes[domain]
        return found if isinstance(found, Deferred) else maybeDeferred(lambda: _raise_or(found))

    def records(self, name: str, rdtype: str) -> Deferred:
        self.asked.append(("records", name, rdtype))
        return maybeDeferred(lambda: _raise_or(self.answers[(name, rdtype)]))


def _raise_or(value):
    if isinstance(value, Exception):
        raise value
    return value


def worker_router(upstream: Upstream, smarthosts: tuple = (), clock: Clock | None = None) -> tuple[Router, list[tuple]]:
    """A Router whose own lookups are recorded and answered at once (no DNS, no threads)."""
    relay = RelayConfig(networks=(), nameservers=(("127.0.0.1", 53),), smarthosts=smarthosts)
    router = Router(relay, "mail.example.test", reactor=clock or Clock())
    router.upstream = upstream
    own: list[tuple] = []

    def resolve(domain: str) -> Route:
        own.append(("route", domain))
        return Route((Hop(f"own.{domain}", ("127.0.0.9",), 25, 10),))

    def records(name: str, rdtype: str) -> Records:
        own.append(("records", name, rdtype))
        return Records(("own",), False, (), 0.0)

    router.resolve = resolve  # type: ignore[method-assign]
    router._records = records  # type: ignore[method-assign]
    router._in_thread = lambda function, *args: maybeDeferred(function, *args)  # type: ignore[method-assign]
    return router, own


def test_the_route_comes_from_upstream_and_is_kept_as_long_as_it_says():
    upstream = Upstream({"remote.test": (ROUTE, 12.0)})
    router, own = worker_router(upstream)
    assert {hop.host for hop in result(router.route("remote.test")).hops} == {"mx1.remote.test", "mx2.remote.test"}
    assert result(router.route("REMOTE.test")).hops[0].host == "mx1.remote.test"  # preferences keep their order
    assert upstream.asked == [("route", "remote.test")] and own == []
    assert 11.0 < router.kept_for("remote.test") <= 12.0
    upstream.routes["long.test"] = (ROUTE, 3600.0)
    result(router.route("long.test"))
    assert router.kept_for("long.test") <= ROUTE_CACHE_SECONDS  # never longer than it keeps its own


def test_a_route_error_from_upstream_is_the_answer():
    upstream = Upstream({"nullmx.test": RouteError(True, "5.1.10", "null MX")})
    router, own = worker_router(upstream)
    with pytest.raises(RouteError, match="5.1.10"):
        result(router.route("nullmx.test"))
    assert own == []


def test_without_an_answer_from_upstream_the_worker_looks_up_itself_and_says_so_once():
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        upstream = Upstream({"a.test": ConnectionDone("gone"), "b.test": ConnectionDone("gone")},
                            {("_mta-sts.a.test", "TXT"): ConnectionDone("gone")})
        router, own = worker_router(upstream)
        assert result(router.route("a.test")).hops[0].host == "own.a.test"
        assert result(router.route("b.test")).hops[0].host == "own.b.test"
        assert result(router.records("_mta-sts.a.test", "TXT")).texts == ("own",)
        # None: the answer does not fit the channel (or it has no Router): no warning, no pause.
        quiet = Upstream({"c.test": None, "d.test": (ROUTE, 30.0)})
        quiet_router, quiet_own = worker_router(quiet)
        assert result(quiet_router.route("c.test")).hops[0].host == "own.c.test"
        assert result(quiet_router.route("d.test")).hops[0].host == "mx1.remote.test"
    finally:
        globalLogPublisher.removeObserver(logged.append)
    warnings = [e for e in logged if e.get("log_level") == LogLevel.warn and "main process unavailable" in e["log_format"]]
    assert len(warnings) == 1
    assert upstream.asked == [("route", "a.test")]  # then not asked for a while
    assert own == [("route", "a.test"), ("route", "b.test"), ("records", "_mta-sts.a.test", "TXT")]
    assert quiet.asked == [("route", "c.test"), ("route", "d.test")] and quiet_own == [("route", "c.test")]


def test_a_main_process_that_does_not_answer_is_not_waited_for_and_not_asked_for_a_while():
    # A stopped or stuck main process (SIGSTOP, a long pause): the worker delivers all the same.
    silent: Deferred = Deferred()
    clock = Clock()
    upstream = Upstream({"a.test": silent, "b.test": (ROUTE, 30.0), "c.test": (ROUTE, 30.0)})
    router, own = worker_router(upstream, clock=clock)
    waiting = router.route("a.test")
    assert not waiting.called
    clock.advance(UPSTREAM_SECONDS)
    assert result(waiting).hops[0].host == "own.a.test"
    assert result(router.route("b.test")).hops[0].host == "own.b.test"  # not asked meanwhile
    clock.advance(UPSTREAM_SKIP_SECONDS)
    assert result(router.route("c.test")).hops[0].host == "mx1.remote.test"  # asked again
    assert upstream.asked == [("route", "a.test"), ("route", "c.test")]
    assert own == [("route", "a.test"), ("route", "b.test")]


def test_one_lookup_of_a_domain_at_a_time_the_others_wait_for_it():
    pending: Deferred = Deferred()
    upstream = Upstream({"remote.test": pending})
    router, own = worker_router(upstream)
    first, second = router.route("remote.test"), router.route("remote.test")
    assert upstream.asked == [("route", "remote.test")]
    pending.callback((ROUTE, 30.0))
    assert result(first).hops[0].host == result(second).hops[0].host == "mx1.remote.test"
    assert own == []


def test_records_are_kept_for_their_ttl_and_a_failure_is_not_kept():
    upstream = Upstream(records={("_mta-sts.a.test", "TXT"): Records(("v=STSv1; id=1;",), False, (), 300.0),
                                 ("_mta-sts.b.test", "TXT"): Records((), False, (), 0.0),
                                 ("_mta-sts.c.test", "TXT"): LookupFailed("SERVFAIL")})
    router, own = worker_router(upstream)
    for _ in range(2):
        assert result(router.records("_mta-sts.a.test", "TXT")).texts == ("v=STSv1; id=1;",)
        assert result(router.records("_mta-sts.b.test", "TXT")).texts == ()
        with pytest.raises(LookupFailed):
            result(router.records("_mta-sts.c.test", "TXT"))
    assert [asked[1] for asked in upstream.asked] == ["_mta-sts.a.test", "_mta-sts.b.test", "_mta-sts.c.test",
                                                      "_mta-sts.b.test", "_mta-sts.c.test"]
    assert own == []


def test_smart_host_routes_are_found_by_each_process_itself():
    upstream = Upstream({"remote.test": (ROUTE, 30.0)})
    router, own = worker_router(upstream, smarthosts=(SmartHostConfig(host="relay1.provider.test", port=587, tls="none", username=None, password_file=None),))
    assert result(router.route("remote.test")).hops[0].host == "own.remote.test"
    assert upstream.asked == [] and own == [("route", "remote.test")]


def test_the_routes_kept_are_bounded(monkeypatch):
    from mailhost.delivery import routing

    monkeypatch.setattr(routing, "ANSWERS_KEPT", 3)
    upstream = Upstream({f"d{i}.test": (ROUTE, 30.0) for i in range(4)})
    router, _ = worker_router(upstream)
    for i in range(3):
        result(router.route(f"d{i}.test"))
    assert all(router.kept_for(f"d{i}.test") > 0 for i in range(3))
    result(router.route("d3.test"))  # one more than kept: the others are forgotten
    assert [router.kept_for(f"d{i}.test") > 0 for i in range(4)] == [False, False, False, True]
