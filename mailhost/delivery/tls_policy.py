"""Which TLS an MX gets: DANE (RFC 7672), else the domain's MTA-STS policy (RFC 8461), else
relay.tls. DANE wins where both exist (RFC 8461 2): it is decided per MX host, from
that host's TLSA records, and MTA-STS applies to the MX hosts without any.

- DANE (relay.dane, the MX RRset and the host's addresses authenticated by the
  validating resolver): authenticated usable TLSA records at _PORT._tcp.HOST mean
  STARTTLS is required and the chain must match them (tls_checks.dane_check); a
  TLSA lookup that fails (SERVFAIL: bogus or unreachable) skips the host (2.2).
  Records that are all unusable still require TLS, unauthenticated (RFC 7672 2.2).
- MTA-STS enforce: only MX hosts the policy lists, over STARTTLS with a certificate
  valid for the host name (tls_checks.WebPki); others are skipped. testing: every MX,
  as relay.tls says, and the check's result is only reported.

Every session held to a policy is counted for TLS-RPT (tlsrpt.TlsResults).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailhost.config import RelayConfig
from mailhost.delivery.mta_sts import MtaSts, Policy, PolicyResult
from mailhost.delivery.routing import Hop, Router
from mailhost.delivery.tls_checks import Tlsa, WebPki, dane_check
from mailhost.delivery.tlsrpt import ReportPolicy, TlsResults
from mailhost.smtp.client import PeerCheck, TlsFailure

TLS_STATUS = "4.7.5"  # RFC 3463 X.7.5 cryptographic failure: kept queued, bounced at queue.lifetime


@dataclass(frozen=True)
class HopTls:
    """How to talk to one MX host, or why not to."""

    tls: str  # smtp.client TLS mode
    check: PeerCheck | None = None
    enforce: bool = False
    pool_key: str = ""  # sessions are reused only under the same policy
    report: ReportPolicy | None = None  # the TLS-RPT policy the session counts for
    label: str = ""  # "MTA-STS policy of example.org (enforce)", for replies and logs
    refusal: str = ""  # set: do not connect to this host; the reply text says why
    refusal_type: str = ""  # its TLS-RPT result type, when it is reported


class TlsPolicies:
    def __init__(self, relay: RelayConfig, router: Router, mta_sts: MtaSts | None, results: TlsResults | None) -> None:
        self.relay = relay
        self._router = router
        self.mta_sts = mta_sts
        self.results = results
        self._webpki: WebPki | None = None

    def reconfigure(self, relay: RelayConfig) -> None:
        self.relay = relay
        self._webpki = None  # ca_file may have changed
        if self.mta_sts is not None:
            self.mta_sts.configure(relay.ca_file, relay.mta_sts_port)

    def for_domain(self, domain: str) -> Deferred[PolicyResult]:
        """The MTA-STS policy of `domain` (none when relay.mta_sts is off)."""
        if self.mta_sts is None or not self.relay.mta_sts:
            return succeed(PolicyResult(None))

        def reported(result: PolicyResult) -> PolicyResult:
            if result.failure and result.policy is None:
                self.record(ReportPolicy(domain, "sts", ()), TlsFailure(result.failure, result.detail))
            return result

        return self.mta_sts.policy(domain).addCallback(reported)

    async def for_hop(self, domain: str, sts: PolicyResult, hop: Hop) -> HopTls:
        """How to treat TLS with `hop` (awaited by the deliverer's coroutine: no Deferred of its own)."""
        if self.relay.dane and hop.secure:
            dane = await self._dane(domain, hop)
            if dane is not None:
                return dane
        policy = sts.policy
        if policy is None or policy.mode == "none":
            return HopTls(self.relay.tls)
        return self._sts(domain, policy, hop)

    async def _dane(self, domain: str, hop: Hop) -> HopTls | None:
        name = f"_{hop.port}._tcp.{hop.host}"
        label = f"DANE TLSA of {hop.host}"
        try:
            found = await self._router.records(name, "TLSA")
        except Exception as e:
            # RFC 7672 2.2: a failed TLSA lookup of a secure host is not a reason to send in the clear.
            return HopTls("required", label=label, refusal=f"{label}: lookup of {name} TLSA failed ({e})",
                          report=ReportPolicy(hop.host, "tlsa", ()), refusal_type="dnssec-invalid")
        if not found.secure or not found.rdatas:
            return None  # no authenticated TLSA records: DANE does not apply to this host
        records = [Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in found.rdatas]
        usable = [r for r in records if r.usable]
        texts = tuple(r.text() for r in records)
        report = ReportPolicy(hop.host, "tlsa", texts)
        digest = hashlib.sha256("\n".join(texts).encode("ascii")).hexdigest()[:16]
        if not usable:
            return HopTls("required", pool_key=f"dane-unusable:{digest}", label=label)
        return HopTls("required", dane_check(usable, [hop.host, domain]), True, f"dane:{digest}", report, label)

    def _sts(self, domain: str, policy: Policy, hop: Hop) -> HopTls:
        label = f"MTA-STS policy of {domain} ({policy.mode})"
        report = ReportPolicy(domain, "sts", tuple(policy.lines()), policy.mx)
        listed = policy.allows(hop.host)
        if policy.mode == "enforce":
            if not listed:
                return HopTls("required", label=label, report=report, refusal_type="validation-failure",
                              refusal=f"{label}: MX host {hop.host} is not one the policy lists "
                                      f"({', '.join(policy.mx)}); not delivered there")
            return HopTls("required", self.webpki().check(hop.host), True, f"sts:{policy.id}", report, label)
        check: PeerCheck = self.webpki().check(hop.host) if listed else _not_listed(hop.host)
        return HopTls(self.relay.tls, check, False, f"sts-testing:{policy.id}", report, label)

    def webpki(self) -> WebPki:
        if self._webpki is None:
            self._webpki = WebPki(self.relay.ca_file)
        return self._webpki

    def record(self, report: ReportPolicy | None, failure: TlsFailure | None, mx_host: str = "",
               address: str = "") -> None:
        if report is not None and self.results is not None:
            self.results.record(report, failure, mx_host, address)


def _not_listed(host: str) -> Any:
    def check(chain: list[Any]) -> TlsFailure | None:
        return TlsFailure("validation-failure", f"MX host {host} is not listed in the MTA-STS policy")

    return check
