"""Routing decisions (mailhost/relay.py) against a real DNS server.

The Router answers with Deferreds and does its lookups on a thread pool, so it
needs a running reactor; a reactor cannot be restarted inside one pytest
process. One driver subprocess per module runs the reactor for all the tests:
each test sends it a JSON line (the router's settings and a domain), the driver
awaits `Router.route()` and answers with a JSON line.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from mailhost.config import RelayConfig
from mailhost.delivery.routing import Router
from tests.support.dns import ROOT, DNSServer

OUR_HOSTNAME = "mail.example.test"

ZONE = [
    # Listed out of order: the router sorts by preference.
    ["remote.test", "MX", "30 mx3.remote.test"],
    ["remote.test", "MX", "10 mx1.remote.test"],
    ["remote.test", "MX", "20 mx2.remote.test"],
    ["mx1.remote.test", "A", "127.0.0.11"],
    ["mx1.remote.test", "A", "127.0.0.12"],
    ["mx1.remote.test", "AAAA", "::1"],
    ["mx2.remote.test", "A", "127.0.0.21"],
    ["mx3.remote.test", "A", "127.0.0.31"],
    ["alias.test", "CNAME", "remote.test"],
    ["bücher.test", "MX", "10 mx1.remote.test"],
    ["equal.test", "MX", "10 a.equal.test"],
    ["equal.test", "MX", "10 b.equal.test"],
    ["equal.test", "MX", "20 c.equal.test"],
    ["a.equal.test", "A", "127.0.0.41"],
    ["b.equal.test", "A", "127.0.0.42"],
    ["c.equal.test", "A", "127.0.0.43"],
    ["implicit.test", "A", "127.0.0.51"],
    ["implicit.test", "AAAA", "::1"],
    ["implicit.test", "TXT", "v=spf1 -all"],
    ["nullmx.test", "MX", "0 ."],
    ["noaddr.test", "TXT", "no MX, no address"],
    ["deadmx.test", "MX", "10 gone.deadmx.test"],
    ["deadmx.test", "MX", "20 nodata.deadmx.test"],
    ["nodata.deadmx.test", "TXT", "a host without an address"],
    ["halfdead.test", "MX", "10 gone.halfdead.test"],
    ["halfdead.test", "MX", "20 mx2.remote.test"],
    ["flakymx.test", "MX", "10 mx.broken.test"],
    ["flakymx.test", "MX", "20 gone.flakymx.test"],
    # We are an MX (by name) for these:
    [OUR_HOSTNAME, "A", "127.0.0.99"],
    ["selfbest.test", "MX", "10 mail.example.test"],
    ["selfbest.test", "MX", "20 mx2.remote.test"],
    ["selfbackup.test", "MX", "10 mx1.remote.test"],
    ["selfbackup.test", "MX", "20 mail.example.test"],
    ["selfbackup.test", "MX", "20 mx3.remote.test"],
    ["selfbackup.test", "MX", "30 mx2.remote.test"],
    # ... and by address, when we listen on 127.0.0.61 or ::1:
    ["me.loop.test", "A", "127.0.0.61"],
    ["me6.loop.test", "AAAA", "::1"],
    ["far.loop.test", "A", "192.0.2.61"],
    ["addrbest.test", "MX", "10 me.loop.test"],
    ["addrbest.test", "MX", "20 mx2.remote.test"],
    ["addrbackup.test", "MX", "10 mx2.remote.test"],
    ["addrbackup.test", "MX", "20 me.loop.test"],
    ["addrbackup.test", "MX", "30 mx3.remote.test"],
    ["v6loop.test", "MX", "10 me6.loop.test"],
    ["farloop.test", "MX", "10 far.loop.test"],
    # Smart hosts:
    ["relay1.provider.test", "A", "127.0.0.71"],
    ["relay1.provider.test", "AAAA", "::1"],
    ["relay2.provider.test", "A", "127.0.0.72"],
]

DRIVER = r"""
import json, sys
from pathlib import Path

from twisted.internet import defer, reactor, stdio, task
from twisted.protocols.basic import LineReceiver

from mailhost.config import RelayConfig, SmartHostConfig
from mailhost.delivery.routing import RouteError, Router


def relay_config(spec):
    return RelayConfig(
        networks=(),
        mx_port=spec.get("mx_port", 25),
        nameservers=tuple(tuple(ns) for ns in spec.get("nameservers", [])),
        smarthosts=tuple(
            SmartHostConfig(host=h["host"], port=h["port"], tls="none", username=None, password_file=None)
            for h in spec.get("smarthosts", [])
        ),
    )


def hop_json(hop):
    return {"host": hop.host, "addresses": list(hop.addresses), "port": hop.port,
            "preference": hop.preference, "smarthost": hop.smarthost.host if hop.smarthost else None}


class Driver(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line):
        defer.ensureDeferred(self.handle(json.loads(line)))

    async def handle(self, request):
        ticks = []
        ticker = task.LoopingCall(lambda: ticks.append(1))
        ticker.start(0.05)
        results = []
        router = None
        try:
            router = Router(relay_config(request["relay"]), request["our_hostname"],
                            {tuple(a) for a in request["our_addresses"]}, timeout=request["timeout"])
            for _ in range(request["repeat"]):
                try:
                    route = await router.route(request["domain"])
                except RouteError as e:
                    results.append({"error": {"permanent": e.permanent, "status": e.status, "text": e.text}})
                else:
                    results.append({"hops": [hop_json(h) for h in route.hops]})
        except Exception as e:
            results.append({"crash": repr(e)})
        finally:
            ticker.stop()
            if router is not None:
                router.stop()
        self.sendLine(json.dumps({"results": results, "ticks": len(ticks)}).encode())

    def connectionLost(self, reason):
        reactor.stop()


stdio.StandardIO(Driver())
reactor.run()
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, servfail=["broken.test"], timeout=["slow.test"]) as server:
        yield server


class RouteDriver:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.lines.get(timeout=60)
        assert line is not None, "the route driver exited"
        answer = json.loads(line)
        for result in answer["results"]:
            assert "crash" not in result, result["crash"]
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def driver() -> Iterator[RouteDriver]:
    d = RouteDriver()
    yield d
    d.close()


@pytest.fixture
def route(driver: RouteDriver, dns_server: DNSServer):
    """route(domain, **settings) -> the one result: {"hops": [...]} or {"error": {...}}."""

    def run(domain: str, *, mx_port: int = 25, smarthosts: list[tuple[str, int]] = (), our_addresses=(),
            our_hostname: str = OUR_HOSTNAME, timeout: float = 5.0, repeat: int = 1, ticks: bool = False):
        answer = driver.ask({
            "domain": domain,
            "relay": {"mx_port": mx_port, "nameservers": [["127.0.0.1", dns_server.port]],
                      "smarthosts": [{"host": h, "port": p} for h, p in smarthosts]},
            "our_hostname": our_hostname,
            "our_addresses": [list(a) for a in our_addresses],
            "timeout": timeout,
            "repeat": repeat,
        })
        if ticks:
            return answer["results"][0], answer["ticks"]
        return answer["results"] if repeat > 1 else answer["results"][0]

    return run


def hosts(result: dict) -> list[str]:
    assert "hops" in result, result
    return [hop["host"] for hop in result["hops"]]


def error(result: dict) -> tuple[bool, str]:
    assert "error" in result, result
    return result["error"]["permanent"], result["error"]["status"]


# -- MX routing ----------------------------------------------------------------------------


def test_mx_hosts_in_preference_order_with_their_preferences(route):
    result = route("remote.test")
    assert hosts(result) == ["mx1.remote.test", "mx2.remote.test", "mx3.remote.test"]
    assert [hop["preference"] for hop in result["hops"]] == [10, 20, 30]
    assert all(hop["smarthost"] is None for hop in result["hops"])


def test_every_a_and_aaaa_address_of_a_host(route):
    mx1 = route("remote.test")["hops"][0]
    assert sorted(mx1["addresses"]) == sorted(["::1", "127.0.0.11", "127.0.0.12"])
    assert mx1["addresses"][0] == "::1"  # IPv6 first, then IPv4


def test_equal_preferences_come_in_both_orders(route):
    results = route("equal.test", repeat=40)
    orders = {tuple(hosts(r)) for r in results}
    assert orders == {
        ("a.equal.test", "b.equal.test", "c.equal.test"),
        ("b.equal.test", "a.equal.test", "c.equal.test"),
    }


def test_mx_port_is_used_for_every_mx_hop(route):
    assert {hop["port"] for hop in route("remote.test", mx_port=2525)["hops"]} == {2525}
    assert {hop["port"] for hop in route("remote.test")["hops"]} == {25}


def test_no_mx_record_means_the_domain_itself_with_no_preference(route):
    result = route("implicit.test", mx_port=2526)
    assert result["hops"] == [
        {"host": "implicit.test", "addresses": ["::1", "127.0.0.51"], "port": 2526, "preference": None,
         "smarthost": None}
    ]


def test_a_cname_to_a_domain_routes_like_that_domain(route):
    assert hosts(route("alias.test")) == ["mx1.remote.test", "mx2.remote.test", "mx3.remote.test"]


def test_an_internationalised_domain_is_looked_up_by_its_a_labels(route):
    assert hosts(route("bücher.test")) == ["mx1.remote.test"]
    assert hosts(route("BÜCHER.test.")) == ["mx1.remote.test"]


def test_an_mx_host_without_address_is_skipped(route):
    result = route("halfdead.test")
    assert hosts(result) == ["mx2.remote.test"]
    assert result["hops"][0]["preference"] == 20


# -- no route ------------------------------------------------------------------------------


def test_null_mx_bounces_with_5_1_10(route):
    result = route("nullmx.test")
    assert error(result) == (True, "5.1.10")
    assert "null MX" in result["error"]["text"]


def test_a_domain_that_does_not_exist_bounces_with_5_1_2(route):
    result = route("nosuch.test")
    assert error(result) == (True, "5.1.2")
    assert "name=nosuch.test type=MX" in result["error"]["text"]


def test_servfail_defers_with_4_4_3(route):
    assert error(route("broken.test")) == (False, "4.4.3")


def test_a_dns_timeout_defers_with_4_4_3_without_blocking_the_reactor(route):
    result, ticks = route("slow.test", timeout=1.0, ticks=True)
    assert error(result) == (False, "4.4.3")
    assert "timeout" in result["error"]["text"]
    assert ticks >= 10  # the reactor ran its 50 ms timer all along the 1 s lookup


def test_mx_hosts_that_do_not_exist_bounce_with_5_4_4(route):
    result = route("deadmx.test")
    assert error(result) == (True, "5.4.4")
    assert "gone.deadmx.test" in result["error"]["text"] or "nodata.deadmx.test" in result["error"]["text"]


def test_no_mx_and_no_address_bounces_with_5_4_4(route):
    assert error(route("noaddr.test")) == (True, "5.4.4")


def test_an_mx_host_lookup_that_fails_for_now_defers(route):
    result = route("flakymx.test")
    assert error(result) == (False, "4.4.3")
    assert "mx.broken.test" in result["error"]["text"]


@pytest.mark.parametrize("domain", ["[127.0.0.1]", "[IPv6:::1]", "127.0.0.1", "bad..name", ""])
def test_address_literals_and_bad_names_are_never_routed(route, domain):
    assert error(route(domain)) == (True, "5.1.2")
    assert error(route(domain, smarthosts=[("relay1.provider.test", 587)])) == (True, "5.1.2")


# -- loops ---------------------------------------------------------------------------------


def test_we_are_the_best_mx_by_name_loops_back(route):
    result = route("selfbest.test")
    assert error(result) == (True, "5.4.6")
    assert result["error"]["text"] == "mail for selfbest.test loops back to myself"


def test_we_are_a_backup_mx_by_name_so_only_better_ones_remain(route):
    # mx3 has our preference (20): dropped with us, as RFC 5321 5.1 says.
    assert hosts(route("selfbackup.test")) == ["mx1.remote.test"]
    assert hosts(route("selfbackup.test", our_hostname="MAIL.example.test.")) == ["mx1.remote.test"]


def test_we_are_the_best_mx_by_address_and_port_loops_back(route):
    assert error(route("addrbest.test", mx_port=2525, our_addresses=[("127.0.0.61", 2525)])) == (True, "5.4.6")


def test_the_same_address_on_another_port_is_not_us(route):
    result = route("addrbest.test", mx_port=25, our_addresses=[("127.0.0.61", 2525)])
    assert hosts(result) == ["me.loop.test", "mx2.remote.test"]


def test_we_are_a_backup_mx_by_address_so_only_better_ones_remain(route):
    assert hosts(route("addrbackup.test", mx_port=2525, our_addresses=[("127.0.0.61", 2525)])) == ["mx2.remote.test"]


def test_an_ipv6_listening_address_is_us_too(route):
    assert error(route("v6loop.test", mx_port=2525, our_addresses=[("::1", 2525)])) == (True, "5.4.6")


def test_a_wildcard_listener_matches_the_local_addresses_on_its_port(route):
    assert error(route("addrbest.test", mx_port=2525, our_addresses=[("0.0.0.0", 2525)])) == (True, "5.4.6")
    assert error(route("v6loop.test", mx_port=2525, our_addresses=[("::", 2525)])) == (True, "5.4.6")
    # 192.0.2.61 is not an address of this machine: a wildcard listener does not make it us.
    assert hosts(route("farloop.test", mx_port=2525, our_addresses=[("0.0.0.0", 2525), ("::", 2525)])) == [
        "far.loop.test"
    ]


def test_the_implicit_mx_being_us_loops_back(route):
    assert error(route("implicit.test", mx_port=2525, our_addresses=[("127.0.0.51", 2525)])) == (True, "5.4.6")
    assert error(route(OUR_HOSTNAME)) == (True, "5.4.6")


# -- smart hosts ---------------------------------------------------------------------------


def test_smart_hosts_take_all_mail_in_config_order_with_their_ports(route):
    smarthosts = [("relay2.provider.test", 587), ("192.0.2.7", 2525), ("relay1.provider.test", 465), ("::1", 26)]
    for domain in ("remote.test", "nosuch.test", "nullmx.test"):  # no MX lookup at all
        result = route(domain, mx_port=2500, smarthosts=smarthosts)
        assert result["hops"] == [
            {"host": "relay2.provider.test", "addresses": ["127.0.0.72"], "port": 587, "preference": None,
             "smarthost": "relay2.provider.test"},
            {"host": "192.0.2.7", "addresses": ["192.0.2.7"], "port": 2525, "preference": None,
             "smarthost": "192.0.2.7"},
            {"host": "relay1.provider.test", "addresses": ["::1", "127.0.0.71"], "port": 465, "preference": None,
             "smarthost": "relay1.provider.test"},
            {"host": "::1", "addresses": ["::1"], "port": 26, "preference": None, "smarthost": "::1"},
        ]


def test_a_smart_host_that_does_not_resolve_is_skipped(route):
    result = route("remote.test", smarthosts=[("gone.provider.test", 587), ("relay2.provider.test", 587)])
    assert hosts(result) == ["relay2.provider.test"]


def test_smart_hosts_that_do_not_resolve_defer_the_mail(route):
    result = route("remote.test", smarthosts=[("gone.provider.test", 587), ("x.broken.test", 587)])
    assert error(result) == (False, "4.4.3")
    assert "gone.provider.test" in result["error"]["text"]


def test_a_smart_host_that_is_us_is_dropped(route):
    smarthosts = [("127.0.0.1", 2525), (OUR_HOSTNAME, 587), ("relay2.provider.test", 587)]
    assert hosts(route("remote.test", smarthosts=smarthosts, our_addresses=[("0.0.0.0", 2525)])) == [
        "relay2.provider.test"
    ]
    assert error(route("remote.test", smarthosts=smarthosts[:2], our_addresses=[("0.0.0.0", 2525)])) == (
        True, "5.4.6")


# -- the helpers themselves ----------------------------------------------------------------


def test_the_dns_test_server_serves_new_records_after_update():
    # Its own server: the module's one stays as ZONE says.
    with DNSServer([["changing.test", "MX", "10 old.changing.test"], ["old.changing.test", "A", "127.0.0.80"]]) as server:
        relay = RelayConfig(networks=(), nameservers=(("127.0.0.1", server.port),))
        router = Router(relay, OUR_HOSTNAME, timeout=2.0)  # resolve(): the blocking form, no reactor needed
        assert [(hop.host, hop.addresses) for hop in router.resolve("changing.test").hops] == [
            ("old.changing.test", ("127.0.0.80",))
        ]
        server.update([["changing.test", "MX", "10 new.changing.test"], ["new.changing.test", "A", "127.0.0.81"]])
        assert [(hop.host, hop.addresses) for hop in router.resolve("changing.test").hops] == [
            ("new.changing.test", ("127.0.0.81",))
        ]


def test_a_listening_address_given_by_name_is_us_too(route):
    smarthosts = [("127.0.0.1", 2525), ("relay2.provider.test", 2525)]
    assert hosts(route("remote.test", smarthosts=smarthosts, our_addresses=[("localhost", 2525)])) == [
        "relay2.provider.test"
    ]
    assert hosts(route("remote.test", smarthosts=smarthosts, our_addresses=[("localhost", 2526)])) == [
        "127.0.0.1", "relay2.provider.test"
    ]


def test_stopping_waits_only_for_the_query_under_way():
    """At shutdown the DNS threads are joined: lookups still waiting for a thread are not made
    (with DNS down, each would have taken its timeout, one thread per THREADS domains)."""
    import time
    from twisted.internet.task import Clock

    import dns.resolver

    from mailhost.config import RelayConfig
    from mailhost.delivery.routing import RouteError, Router

    gate = threading.Event()
    asked: list[str] = []

    class DownResolver:
        def resolve(self, name, rdtype, search=False):
            asked.append(name.to_text())
            gate.wait(10)
            raise dns.resolver.NoNameservers()

    class Reactor(Clock):
        def callFromThread(self, f, *args, **kwargs):
            pass  # results are not looked at here

        def addSystemEventTrigger(self, *args):
            return object()

        def removeSystemEventTrigger(self, trigger):
            pass

    class OneThread(Router):
        THREADS = 1

    router = OneThread(RelayConfig(networks=(), mx_port=25, nameservers=(), smarthosts=()), OUR_HOSTNAME,
                       resolver=DownResolver(), reactor=Reactor())
    for domain in ("first.test", "second.test", "third.test"):
        router.route(domain)
    deadline = time.monotonic() + 10
    while not asked and time.monotonic() < deadline:
        time.sleep(0.01)
    stopping = threading.Thread(target=router.stop)
    stopping.start()
    while not router.stopping and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()  # the query under way ends (its timeout, in real life)
    stopping.join(10)
    assert not stopping.is_alive()
    assert asked == ["first.test."]
    with pytest.raises(RouteError) as refused:
        router.resolve("fourth.test")
    assert (refused.value.permanent, refused.value.status) == (False, "4.4.3") and "stopping" in refused.value.text


def test_a_lookup_after_stop_is_refused_and_starts_no_threads():
    """Stopped is stopped: a lookup that arrives after the shutdown trigger ran gets the
    documented 4.4.3 (the mail stays queued) instead of a new DNS pool nothing would stop."""
    from twisted.internet.task import Clock

    from mailhost.delivery.routing import RouteError

    triggers: list[object] = []

    class Reactor(Clock):
        def callFromThread(self, f, *args, **kwargs):
            pass  # no lookup result is expected

        def addSystemEventTrigger(self, *args):
            triggers.append(args)
            return object()

        def removeSystemEventTrigger(self, trigger):
            pass

    class NeverAsked:
        def resolve(self, name, rdtype, search=False):
            raise AssertionError(f"{name} looked up after stop()")

    router = Router(RelayConfig(networks=(), mx_port=25, nameservers=(), smarthosts=()), OUR_HOSTNAME,
                    resolver=NeverAsked(), reactor=Reactor())
    router.stop()
    failures = []
    try:
        for lookup in (router.route("late.test"), router.records("late.test", "TXT"),
                       router.addresses("mx.late.test")):
            lookup.addErrback(failures.append)
        assert triggers == []  # start() was not called: no pool, no shutdown trigger for one
        assert not [t.name for t in threading.enumerate() if "mailhost-dns" in t.name]
    finally:
        router.stop()  # (a pool the lookups started would keep pytest from exiting)
    assert [(f.check(RouteError), f.value.status, "stopping" in f.value.text) for f in failures] == \
        [(RouteError, "4.4.3", True)] * 3
