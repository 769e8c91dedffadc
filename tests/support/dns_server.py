"""A small authoritative DNS server for tests, on UDP and TCP (same port).

    python -m tests.support.dns_server --listen 127.0.0.1:PORT --zone ZONE.json [--queries FILE]

The zone file:

    {"records": [["remote.test", "MX", "10 mx1.remote.test"],
                 ["mx1.remote.test", "A", "127.0.0.5"],
                 ["mx1.remote.test", "AAAA", "::1"],
                 ["nullmx.test", "MX", "0 ."],
                 ["alias.test", "CNAME", "remote.test"],
                 ["s1._domainkey.example.test", "TXT", "v=DKIM1; k=rsa; p=..."]],
     "servfail": ["broken.test"],
     "timeout": ["slow.test"]}

Answers follow ordinary DNS semantics for one authoritative server holding all
of these names:

- a listed name: its records of the asked type (ANY: all of them); a CNAME is
  followed within the zone; no record of that type: NOERROR with no answer;
- a name with listed names below it (an "empty non-terminal", such as
  `_domainkey.example.test` above): NOERROR with no answer;
- any other name: NXDOMAIN;
- a name in "servfail", or below one: SERVFAIL; in "timeout", or below one: no
  answer at all.

Types: A, AAAA, MX ("PREF HOST", HOST "." for a null MX), TXT (a string is
split into 255-byte character-strings; a list gives the strings), CNAME. Names
may be given as U-labels; they are served by their A-labels.

With --queries, every query is appended to FILE as a line "NAME TYPE" (a test
counts what was asked). PORT 0 picks a free port that is free for both UDP and TCP. Once listening the
server prints `ready PORT`. SIGHUP re-reads the zone file and prints
`reloaded` (or `reload failed: WHY`, keeping the old zone). SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.names import dns, server

DEFAULT_TTL = 0  # tests change records mid-run; a benchmark asks for a real TTL in the zone file
MAX_CNAME_CHAIN = 8

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "CNAME": dns.CNAME}


def normalise(name: str) -> str:
    """Lower-case A-label text without the final dot ("" is the root)."""
    name = name.strip().rstrip(".")
    if not name:
        return ""
    try:
        name = name.encode("ascii").decode("ascii")
    except UnicodeEncodeError:
        import dns.name as dnspython_name  # dnspython is a mailhost dependency

        name = dnspython_name.from_text(name).to_text(omit_final_dot=True)
    return name.lower()


def _below(name: str, parent: str) -> bool:
    return name == parent or name.endswith("." + parent)


def _txt_strings(value: str | list[str]) -> list[bytes]:
    if isinstance(value, list):
        return [v.encode("utf-8") for v in value]
    data = value.encode("utf-8")
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


def _record(name: str, kind: str, value, ttl: int) -> dns.RRHeader:
    if kind not in _TYPES:
        raise ValueError(f"{name}: type {kind!r} is not one of {', '.join(_TYPES)}")
    if kind == "A":
        payload = dns.Record_A(value, ttl=ttl)
    elif kind == "AAAA":
        payload = dns.Record_AAAA(value, ttl=ttl)
    elif kind == "MX":
        preference, host = str(value).split()
        payload = dns.Record_MX(int(preference), normalise(host).encode("ascii"), ttl=ttl)
    elif kind == "TXT":
        payload = dns.Record_TXT(*_txt_strings(value), ttl=ttl)
    else:
        payload = dns.Record_CNAME(normalise(value).encode("ascii"), ttl=ttl)
    return dns.RRHeader(name.encode("ascii"), _TYPES[kind], dns.IN, ttl, payload, auth=True)


@dataclass
class Zone:
    records: dict[str, list[dns.RRHeader]] = field(default_factory=dict)
    nonterminals: set[str] = field(default_factory=set)
    servfail: tuple[str, ...] = ()
    timeout: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Zone:
        data = json.loads(path.read_text())
        zone = cls(
            servfail=tuple(normalise(n) for n in data.get("servfail", [])),
            timeout=tuple(normalise(n) for n in data.get("timeout", [])),
        )
        for entry in data.get("records", []):
            name, kind, value = entry
            name = normalise(name)
            zone.records.setdefault(name, []).append(_record(name, kind.upper(), value, data.get("ttl", DEFAULT_TTL)))
            labels = name.split(".")
            for i in range(1, len(labels)):
                zone.nonterminals.add(".".join(labels[i:]))
        return zone

    def answer(self, name: str, qtype: int) -> tuple[int, list[dns.RRHeader]] | None:
        """(rcode, answers) for a query, or None for no reply at all."""
        if any(_below(name, slow) for slow in self.timeout):
            return None
        if any(_below(name, broken) for broken in self.servfail):
            return dns.ESERVER, []
        answers: list[dns.RRHeader] = []
        for _ in range(MAX_CNAME_CHAIN):
            records = self.records.get(name)
            if records is None:
                return (dns.OK if name in self.nonterminals or answers else dns.ENAME), answers
            matching = [r for r in records if qtype in (r.type, dns.ALL_RECORDS)]
            if matching:
                return dns.OK, answers + matching
            cname = [r for r in records if r.type == dns.CNAME]
            if not cname:
                return dns.OK, answers
            answers.append(cname[0])
            name = cname[0].payload.name.name.decode("ascii").lower()
            if any(_below(name, slow) for slow in self.timeout):
                return None
            if any(_below(name, broken) for broken in self.servfail):
                return dns.ESERVER, []
        return dns.ESERVER, []  # a CNAME loop


class ZoneServerFactory(server.DNSServerFactory):
    """Answers every query from the zone; authoritative for all of it."""

    def __init__(self, zone: Zone, queries=None) -> None:
        super().__init__(verbose=0)
        self.zone = zone
        self.queries = queries  # a text file each query is written to, or None

    def handleQuery(self, message, protocol, address):
        query = message.queries[0]
        if self.queries is not None:
            self.queries.write(f"{query.name.name.decode('ascii', 'replace').lower()} {dns.QUERY_TYPES.get(query.type, query.type)}\n")
            self.queries.flush()
        result = self.zone.answer(query.name.name.decode("ascii", "replace").lower().rstrip("."), query.type)
        if result is None:
            return  # the "timeout" names
        rcode, answers = result
        response = self._responseFromMessage(message=message, rCode=rcode, answers=answers)
        response.auth = True
        self.sendReply(protocol, response, address)


def listen(factory: ZoneServerFactory, host: str, port: int) -> int:
    """Listen on TCP and UDP at the same port (a free one when port is 0)."""
    for _ in range(50):
        tcp = reactor.listenTCP(port, factory, interface=host)
        chosen = tcp.getHost().port
        try:
            reactor.listenUDP(chosen, dns.DNSDatagramProtocol(controller=factory), interface=host)
        except CannotListenError:
            tcp.stopListening()
            if port:
                raise
            continue
        return chosen
    raise CannotListenError(host, port, "no port free for both TCP and UDP")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dns_server")
    parser.add_argument("--listen", required=True, help="HOST:PORT or [V6HOST]:PORT; port 0 picks one")
    parser.add_argument("--zone", required=True, type=Path, help="the zone JSON file")
    parser.add_argument("--queries", type=Path, help="append each query to this file as NAME TYPE")
    args = parser.parse_args(argv)
    host, _, port_text = args.listen.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        zone = Zone.load(args.zone)
    except (OSError, ValueError, TypeError) as error:
        print(f"dns_server: {error}", file=sys.stderr)
        return 2

    factory = ZoneServerFactory(zone, open(args.queries, "a", encoding="ascii") if args.queries else None)

    def reload() -> None:
        try:
            factory.zone = Zone.load(args.zone)
        except (OSError, ValueError, TypeError) as error:
            print(f"reload failed: {error}", flush=True)
        else:
            print("reloaded", flush=True)

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    try:
        chosen = listen(factory, host, port)
    except CannotListenError as error:
        print(f"dns_server: {error}", file=sys.stderr)
        return 2
    print(f"ready {chosen}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
