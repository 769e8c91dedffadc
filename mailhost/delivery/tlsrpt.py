"""SMTP TLS Reporting (RFC 8460): count each delivery session's TLS outcome per policy
domain, and send each domain that asks (`_smtp._tls.DOMAIN` TXT "v=TLSRPTv1; rua=mailto:...")
one report per period by mail, through our own queue (the intake's one path, as our DSNs).

- `TlsResults` (every delivering process): counters in memory, added every FLUSH seconds
  to state_dir/tlsrpt/<period start>/p<process>.json (one file per process, so no lock;
  replaced atomically). Bounded: MAX_POLICIES per period and process, MAX_DETAILS
  failure lines per policy (further failures still count in the summary).
- `TlsReporter` (the main process): for each period that has ended, merges the process
  files, looks up each domain's TLSRPT record, mails the gzip'd JSON report (RFC 8460
  4.4, 5.3) to its mailto: addresses and removes the period's folder. A domain whose
  lookup fails for now is tried again at the next check, for at most KEEP_PERIODS.

A period is a UTC day (RFC 8460 4.1), aligned to midnight; `relay.tls_report_interval`
shortens it (tests, troubleshooting).
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailhost.ops.durable import write_file_atomically
from mailhost.smtp.client import TlsFailure

log = Logger(namespace="mailhost.tlsrpt")

MAX_POLICIES = 5000  # policies (domains) counted per period and process
MAX_DETAILS = 50  # distinct failure lines per policy
MAX_RUA = 4  # report addresses used per domain
REASON_MAX = 200  # characters of a failure-reason-code
KEEP_PERIODS = 3  # a period whose reports could not all be sent is given up after this many more
_ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"\\]+@[A-Za-z0-9.-]+")


@dataclass(frozen=True)
class ReportPolicy:
    """The policy a session was held to (RFC 8460 4.4 "policy")."""

    domain: str  # the policy domain: the recipient domain (sts), the TLSA base domain (tlsa)
    kind: str  # "sts" | "tlsa"
    strings: tuple[str, ...]  # the policy: its lines (sts) or the TLSA records (tlsa)
    mx: tuple[str, ...] = ()  # sts: the policy's mx patterns

    def key(self) -> str:
        return json.dumps([self.domain, self.kind, list(self.strings), list(self.mx)])


def parse_tlsrpt_record(strings: list[str]) -> list[str]:
    """The mailto: addresses of a `_smtp._tls` TXT RRset (RFC 8460 3); [] unless exactly
    one record starts with v=TLSRPTv1. https: URIs are left out (not sent)."""
    records = [text for text in strings if text.startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []
    fields = {}
    for part in records[0].split(";"):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "TLSRPTv1":
        return []
    addresses = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip()
        if uri[:7].lower() == "mailto:":
            address = unquote(uri[7:].partition("?")[0])
            if _ADDRESS.fullmatch(address) and address not in addresses:
                addresses.append(address)
    return addresses[:MAX_RUA]


def period_start(now: float, interval: float) -> int:
    """The start (epoch seconds) of the period `now` is in: whole periods since midnight UTC."""
    return int(now // interval * interval)


class TlsResults:
    """One process's counts, by period and policy."""

    def __init__(self, folder: Path, process: int, interval: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.process = process
        self.interval = interval
        self._clock = clock
        self._counts: dict[int, dict[str, dict[str, Any]]] = {}
        self._writing = threading.Lock()  # the timer's flush and the one at stop may overlap

    def record(self, policy: ReportPolicy, failure: TlsFailure | None, mx_host: str = "", receiving_ip: str = "",
               sending_ip: str = "") -> None:
        period = self._counts.setdefault(period_start(self._clock(), self.interval), {})
        key = policy.key()
        entry = period.get(key)
        if entry is None:
            if len(period) >= MAX_POLICIES:
                return
            entry = period[key] = {"policy": key, "success": 0, "failure": 0, "details": {}}
        if failure is None:
            entry["success"] += 1
            return
        entry["failure"] += 1
        detail = json.dumps([failure.result_type, sending_ip, receiving_ip, mx_host, failure.detail[:REASON_MAX]])
        details = entry["details"]
        if detail in details or len(details) < MAX_DETAILS:
            details[detail] = details.get(detail, 0) + 1

    def flush(self) -> None:
        """Add the counts to this process's files (blocking: run it in a thread)."""
        counts, self._counts = self._counts, {}
        with self._writing:
            self._write(counts)

    def _write(self, counts: dict[int, dict[str, dict[str, Any]]]) -> None:
        for start, policies in counts.items():
            folder = self.folder / str(start)
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / f"p{self.process}.json"
            merged = _read(path)
            _merge(merged, policies.values())
            write_file_atomically(path, json.dumps(list(merged.values())).encode("utf-8"))


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, list):
        return {}
    return {e["policy"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("policy"), str)}


def _merge(into: dict[str, dict[str, Any]], entries: Any) -> None:
    for entry in entries:
        try:
            key = entry["policy"]
            target = into.get(key)
            if target is None:
                if len(into) >= MAX_POLICIES:
                    continue
                target = into[key] = {"policy": key, "success": 0, "failure": 0, "details": {}}
            target["success"] += int(entry["success"])
            target["failure"] += int(entry["failure"])
            for detail, count in dict(entry["details"]).items():
                if detail in target["details"] or len(target["details"]) < MAX_DETAILS:
                    target["details"][detail] = target["details"].get(detail, 0) + int(count)
        except (KeyError, TypeError, ValueError):
            continue  # a damaged entry is left out, not the report


def _iso(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(domain: str, entries: list[dict[str, Any]], start: int, end: int, hostname: str,
                 report_id: str) -> dict[str, Any]:
    """The RFC 8460 4.4 JSON report for one policy domain."""
    policies = []
    for entry in entries:
        policy_domain, kind, strings, mx = json.loads(entry["policy"])
        policy: dict[str, Any] = {"policy-type": kind, "policy-string": strings, "policy-domain": policy_domain}
        if kind == "sts":
            policy["mx-host"] = mx
        details = []
        for detail, count in entry["details"].items():
            result_type, sending_ip, receiving_ip, mx_host, reason = json.loads(detail)
            line = {"result-type": result_type, "failed-session-count": count}
            if sending_ip:
                line["sending-mta-ip"] = sending_ip
            if receiving_ip:
                line["receiving-ip"] = receiving_ip
            if mx_host:
                line["receiving-mx-hostname"] = mx_host
            if reason:
                line["failure-reason-code"] = reason
            details.append(line)
        policies.append({
            "policy": policy,
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": entry["failure"]},
            **({"failure-details": details} if details else {}),
        })
    return {
        "organization-name": hostname,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end - 1)},
        "contact-info": f"postmaster@{hostname}",
        "report-id": report_id,
        "policies": policies,
    }


def report_message(report: dict[str, Any], domain: str, rua: str, hostname: str, start: int, end: int) -> bytes:
    """The report mail (RFC 8460 5.3): multipart/report; report-type="tlsrpt", the gzip'd JSON
    as application/tlsrpt+gzip named submitter!domain!begin!end!id.json.gz (5.1)."""
    message = EmailMessage()
    message["From"] = f"TLS reports <noreply-smtp-tls-reporting@{hostname}>"
    message["To"] = rua
    message["Subject"] = f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report['report-id']}>"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=hostname)
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = hostname
    message.set_content(f"This is an aggregate TLS report from {hostname} for {domain}, "
                        f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']} "
                        "(RFC 8460).\n")
    data = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    unique = report["report-id"].partition("@")[0].replace("!", "-")
    message.add_attachment(data, maintype="application", subtype="tlsrpt+gzip",
                           filename=f"{hostname}!{domain}!{start}!{end - 1}!{unique}.json.gz")
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()


class TlsReporter:
    """Sends the reports of the periods that have ended (the main process; a TimerService calls `run`)."""

    def __init__(self, folder: Path, dns: Any, notify: Callable[[str, bytes], Deferred[str]], hostname: str,
                 interval: float = 86400.0, grace: float = 60.0, clock: Callable[[], float] = time.time,
                 run_blocking: Callable[..., Deferred[Any]] = deferToThread) -> None:
        self.folder = folder
        self._blocking = run_blocking  # file work off the reactor (the daemon's disk threads)
        self._dns = dns  # delivery.routing.Router
        self._notify = notify  # intake.notify: into the queue from <>
        self._hostname = hostname
        self.interval = interval
        self._grace = grace  # the processes' flush interval: their last counts are in by then
        self._clock = clock
        self._running = False

    def run(self) -> Deferred[None]:
        if self._running:
            return Deferred.fromCoroutine(_nothing())
        self._running = True

        def done(result: Any) -> None:
            self._running = False
            if hasattr(result, "getTraceback"):
                log.failure("TLS reports", result)

        return Deferred.fromCoroutine(self._run()).addBoth(done)

    async def _run(self) -> None:
        now = self._clock()
        try:
            names = await self._blocking(os.listdir, self.folder)
        except OSError:
            return
        for name in sorted(names):
            if not name.isdigit():
                continue
            start = int(name)
            end = start + int(self.interval)
            if end + self._grace > now:
                continue  # still being counted
            complete = await self._send_period(start, end)
            if complete or now - end > KEEP_PERIODS * self.interval:
                await self._blocking(shutil.rmtree, self.folder / name, True)

    async def _send_period(self, start: int, end: int) -> bool:
        """Send this period's reports; True once nothing is left to send."""
        folder = self.folder / str(start)
        merged: dict[str, dict[str, Any]] = {}

        def read_all() -> None:
            for path in sorted(folder.glob("p*.json")):
                _merge(merged, _read(path).values())

        await self._blocking(read_all)
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for entry in merged.values():
            by_domain.setdefault(json.loads(entry["policy"])[0], []).append(entry)
        sent_file = folder / "sent.json"
        sent = set(await self._blocking(lambda: _read_list(sent_file)))
        complete = True
        for domain, entries in sorted(by_domain.items()):
            if domain in sent:
                continue
            try:
                addresses = parse_tlsrpt_record(await self._dns.txt(f"_smtp._tls.{domain}"))
            except Exception as e:  # SERVFAIL, timeout: the next check tries again
                log.info("TLS report for {domain} waits: _smtp._tls lookup failed ({error})", domain=domain, error=e)
                complete = False
                continue
            day = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y-%m-%d")
            report_id = f"{day}.{start}.{secrets.token_hex(6)}@{self._hostname}"
            report = build_report(domain, entries, start, end, self._hostname, report_id)
            for address in addresses:
                queue_id = await self._notify(address, report_message(report, domain, address, self._hostname,
                                                                      start, end))
                log.info("{id}: TLS report for {domain} to {rua} ({sessions} sessions)", id=queue_id, domain=domain,
                         rua=address, sessions=sum(e["success"] + e["failure"] for e in entries))
            sent.add(domain)
            await self._blocking(write_file_atomically, sent_file, json.dumps(sorted(sent)).encode("utf-8"))
        return complete


def _read_list(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


async def _nothing() -> None:
    return None
