"""What happens to a message between its DATA and the intake:

- mail from outside (the mx role, anonymous): SPF, DKIM and DMARC into one
  Authentication-Results: header, forged ones claiming our name removed, and
  optionally a refusal when DMARC fails under p=reject;
- mail from our users and relay networks: a DKIM signature when the From:
  domain has a key;
- bounce reports (to VERP addresses, or any DSN to a local address): their
  hard and soft failures go into the suppression list.

DNS and signing run on a small thread pool of their own, never on the reactor.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailhost.config import Config
from mailhost.authn.dkim import Signer, from_domain, sign
from mailhost.authn.inbound import evaluate, strip_forged_results
from mailhost.smtp.wire import Reply
from mailhost.feedback.suppression import SuppressionList, parse_dsn

log = Logger(namespace="mailhost.content")


class ContentSteps:
    def __init__(self, config: Config, signer: Signer, suppression: SuppressionList, run: Any) -> None:
        self.config = config
        self.signer = signer
        self.suppression = suppression
        self._run = run  # DiskWriter.run of the content thread pool

    def from_outside(self, client_ip: str, helo: str, sender: str, body: bytes) -> Deferred[bytes | Reply]:
        """Authentication-Results: for mail from outside; a Reply when DMARC says reject (and we honour it)."""
        hostname = self.config.server.hostname
        if not self.config.inbound.authenticate:
            return succeed(strip_forged_results(body, hostname))
        deferred = self._run(partial(
            evaluate, hostname=hostname, client_ip=client_ip, helo=helo or "", mail_from=sender, message=body,
            nameservers=self.config.relay.nameservers,
        ))

        def judged(verdict: Any) -> bytes | Reply:
            if self.config.inbound.dmarc_reject and verdict.dmarc == "fail" and verdict.dmarc_policy == "reject":
                domain = from_domain(body) or "the From: domain"
                return Reply(550, "5.7.1", f"Message refused: DMARC policy of {domain} is reject and it failed")
            header = f"Authentication-Results: {verdict.header}\n".encode("utf-8")
            return header + strip_forged_results(body, hostname)

        return deferred.addCallback(judged)

    def sign(self, body: bytes) -> Deferred[bytes]:
        """The message with a DKIM-Signature: when its From: domain has a key; unchanged otherwise."""
        # No key at all (the common case for a host that does not sign): skip reading From:.
        key = self.signer.key_for(from_domain(body)) if self.signer.has_keys() else None
        if key is None:
            return succeed(body)
        return self._run(sign, body, key).addCallback(lambda header: header + body)

    def record_bounces(self, body: bytes) -> Deferred[list[str]]:
        """Feed a bounce report's failures to the suppression list; fires with the newly suppressed."""
        return self._run(self._record, body)

    def _record(self, body: bytes) -> list[str]:
        suppressed = []
        for report in parse_dsn(body):
            if self.suppression.is_suppressed(report.recipient) is None and self.suppression.record_bounce(report):
                suppressed.append(report.recipient)
                log.info("suppressed <{rcpt}>: {status} {diagnostic}", rcpt=report.recipient, status=report.status,
                         diagnostic=report.diagnostic)
        return suppressed
