"""The one intake path: every message enters mailhost by `Intake.receive(incoming, origin)`,
whatever its door (SMTP on any role, `mailhost sendmail`, our own DSNs, the HTTP API).

The steps, in order, each written once here (cf. Postfix's cleanup(8)):

1. hop limit (RFC 5321 6.3): more than HOP_LIMIT Received: fields is a loop;
2. fix-ups by origin: Message-ID: and Date: for our own senders (RFC 6409 8.3, 8.4), and
   Feedback-ID: (Gmail's feedback loop) when `[unsubscribe] feedback_id` is set; never for
   mail from outside;
3. sender ownership: an authenticated user's originator fields (From:, Sender:, Resent-From:,
   Resent-Sender:) name only its own addresses in our domains, an API key's envelope sender
   and originator fields only its allowed senders, and the header section reads one way
   only (RFC 5322, obsolete syntax included);
4. inbound authentication for mail from outside: SPF, DKIM, DMARC into
   Authentication-Results:, forged ones removed, DMARC p=reject honoured when configured;
5. per-recipient policy and suppression (the SMTP door asked the same question at RCPT);
6. bounce reports (RFC 3464) and complaint reports (RFC 5965 ARF) about our mail feed the
   suppression list, the event log and the complaint rate, and mail to an unsubscribe+TOKEN
   address unsubscribes (consumed: never stored);
7. unsubscribe headers (RFC 8058) for our marketing senders' mail to one recipient;
8. DKIM signing when the From: domain has a key, except for mail from outside;
9. Received: (RFC 5321 4.4), split into local copies and a spool envelope, durable commit;
   what an alias forwards to remote addresses gets an SRS return path in the alias's
   domain (feedback.srs), in an envelope of its own.

A refusal comes back as a `Refused` failure carrying the SMTP reply; any other failure is
an error the door answers with 451 4.3.0.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from mailhost.authn.dkim import DkimKey, Signer, sign
from mailhost.authn.inbound import evaluate, strip_forged_results
from mailhost.config import Config, UnsubscribeConfig
from mailhost.feedback.arf import Complaint, is_feedback_report, parse_arf
from mailhost.feedback.complaints import ComplaintRate, provider_of
from mailhost.feedback.suppression import SuppressionList, address_key, parse_dsn
from mailhost.feedback.traffic import Traffic
from mailhost.feedback.unsubscribe import (Unsubscribe, UnsubscribeTokens, base_url, list_unsubscribe_headers,
                                           record_unsubscribe)
from mailhost.intake.origin import DSN, SMTP, Origin
from mailhost.intake.policy import RecipientVerdict, check_key_sender, check_originators, recipient_verdict
from mailhost.feedback.srs import Srs
from mailhost.intake.submission import feedback_id, missing_headers
from mailhost.local.mailbox import Copy, LocalDomains, Resolution, deliver_copies
from mailhost.message import (HOP_LIMIT, domain_of, from_addresses, from_domain, has_fields, read_headers,
                              too_many_hops)
from mailhost.multiproc.shard import Shard
from mailhost.ops.durable import DiskWriter, GroupSync, Staged
from mailhost.feedback.dsn import DELIVERED as DELIVERED_REPORT, build_dsn
from mailhost.queue.envelope import DELIVERED, Envelope, Recipient
from mailhost.queue.spool import Spool
from mailhost.smtp.wire import Address, Reply, SMTPError, parse_path

log = Logger(namespace="mailhost.intake")


def received_date() -> str:
    """The RFC 5322 date for a Received: line, made once a second (formatdate is slow)."""
    return _date_of_second(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_of_second(second: int) -> str:
    return formatdate(second, localtime=True)


def delivery_headers(sender: str, mailbox: str) -> bytes:
    """The header lines a local copy gets on top: who the envelope said, and for whom."""
    return f"Return-Path: <{sender}>\nDelivered-To: {mailbox}\n".encode("utf-8")


class Refused(Exception):
    """The intake will not take the message; `reply` says why, as SMTP would."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.status} {reply.text}")
        self.reply = reply


@dataclass
class Incoming:
    """A message at the door: the envelope as given, and the message with LF line endings.

    `resolved` holds what a door already decided per recipient (SMTP at RCPT time), so
    the question is not asked twice; other recipients are checked here."""

    sender: str  # "" is the null sender <>
    recipients: list[str]
    message: bytes
    body_8bit: bool = False
    smtputf8: bool = False
    resolved: dict[str, Resolution] = field(default_factory=dict)
    # RFC 3461, as the door was given them: RET, ENVID, and NOTIFY / ORCPT per recipient address.
    ret: str | None = None
    envid: str | None = None
    notify: dict[str, list[str]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)

    def recipient_dsn(self, address: str, final: str) -> dict[str, Any]:
        """NOTIFY and ORCPT for `final`, a queued address that RCPT `address` became: an alias
        passes its recipient's on (RFC 3461 6.2.7.3), and the alias itself is the original
        recipient when the client named none."""
        orcpt = self.orcpt.get(address) or (f"rfc822;{address}" if final != address else None)
        return {"notify": self.notify.get(address), "orcpt": orcpt}


@dataclass
class Receipt:
    """What the intake did: the queue id, how many local copies and queued recipients,
    and the recipients it refused (with the reply) when the door had not checked them."""

    queue_id: str
    local: int
    queued: int
    refused: list[tuple[str, Reply]] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)  # newly, from a bounce report


@dataclass(frozen=True)
class IntakeSettings:
    """The part of the configuration the intake reads; replaced as a whole on reload."""

    hostname: str
    authenticate: bool  # [inbound] authenticate
    dmarc_reject: bool  # [inbound] dmarc_reject
    nameservers: tuple[tuple[str, int], ...]
    hide_client: bool  # [submission] hide_client
    verp: bool  # [relay] verp
    consume_bounces: bool  # [bounces] consume
    unsubscribe: UnsubscribeConfig = UnsubscribeConfig()  # [unsubscribe]
    unsubscribe_url: str | None = None  # base of the https links: [http] public_url or the endpoint
    feedback_addresses: tuple[str, ...] = ()  # [feedback] addresses
    feedback_id: str | None = None  # [unsubscribe] feedback_id
    srs: bool = True  # [srs] enabled: rewrite the return path of mail aliases forward

    @classmethod
    def of(cls, config: Config) -> IntakeSettings:
        return cls(config.server.hostname, config.inbound.authenticate, config.inbound.dmarc_reject,
                   config.relay.nameservers, config.submission.hide_client, config.relay.verp,
                   config.bounces.consume, config.unsubscribe,
                   base_url(config.http.public_url, config.http.endpoint, config.server.hostname),
                   config.feedback.addresses, config.unsubscribe.feedback_id, config.srs.enabled)


class Intake:
    def __init__(self, config: Config, writer: DiskWriter, spool: Spool, domains: LocalDomains, signer: Signer,
                 suppression: SuppressionList, run_content: Callable[..., Deferred[Any]], shard: Shard,
                 on_queued: Callable[[Envelope], None] = lambda envelope: None,
                 unsubscribe: UnsubscribeTokens | None = None, complaint_rate: ComplaintRate | None = None,
                 traffic: Traffic | None = None, srs: Srs | None = None) -> None:
        self.settings = IntakeSettings.of(config)
        self._writer = writer
        self._spool = spool
        self._group: GroupSync | None = None  # made at the first queued-only commit
        self.domains = domains
        self.signer = signer
        self.suppression = suppression
        self._run = run_content  # the content thread pool: DNS and signing off the reactor
        self.shard = shard
        self.on_queued = on_queued
        self.unsubscribe = unsubscribe  # None: no headers added, no unsubscribe+TOKEN addresses
        self.complaint_rate = complaint_rate  # complaints counted here, deliveries by the scheduler
        self.traffic = traffic  # messages received per minute (the web console's charts)
        # None: no SRS. Bounces to SRS addresses are verified also with [srs] enabled = false,
        # so that turning it off does not lose the bounces of mail already forwarded.
        self.srs = srs

    def reconfigure(self, config: Config, signer: Signer | None = None) -> list[str]:
        """Take the new settings (SIGHUP); returns the names of the sections that changed."""
        settings = IntakeSettings.of(config)
        changed = [] if settings == self.settings else ["inbound/submission/relay.verp/bounces/unsubscribe/feedback"]
        self.settings = settings
        if signer is not None:
            self.signer = signer
        return changed

    # --- the one path ------------------------------------------------------------

    def receive(self, incoming: Incoming, origin: Origin) -> Deferred[Receipt]:
        """Take `incoming` in; fires with a Receipt once every part is durable, or fails
        with Refused (say the reply) or any other error (say 451 4.3.0)."""
        # The steps run synchronously while none has to wait (the usual case for our own
        # senders' mail): a Deferred per step would cost more than the step.
        try:
            message = self._prepare(incoming, origin)
            checked = self._inbound_checks(message, incoming, origin)
            if isinstance(checked, Deferred):
                return checked.addCallback(self._recipients_and_bounces, incoming, origin)
            return self._recipients_and_bounces(checked, incoming, origin)
        except Exception:
            return fail()

    def recipient_verdict(self, address: Address, origin: Origin, sender: str = "") -> RecipientVerdict:
        """The RCPT decision (intake.policy.recipient_verdict) with this intake's lists, for a
        message from envelope `sender`."""
        return recipient_verdict(address, origin, self.domains, self.suppression, self.settings.verp, sender,
                                 self.unsubscribe, self.settings.feedback_addresses, self.srs)

    def notify(self, recipient: str, report: bytes) -> Deferred[str]:
        """Send a report this host wrote (a DSN, a delay warning) from <> to `recipient`;
        fires with its queue id."""
        incoming = Incoming("", [recipient], report)
        return self.receive(incoming, Origin(DSN)).addCallback(lambda receipt: receipt.queue_id)

    # --- the steps -------------------------------------------------------------------

    def _prepare(self, incoming: Incoming, origin: Origin) -> bytes:
        """Hop limit, fix-ups and sender ownership: the steps that need no waiting."""
        message = incoming.message
        if too_many_hops(message):
            raise Refused(Reply(554, "5.4.6", f"Too many hops (more than {HOP_LIMIT} Received: headers): mail loop?"))
        if origin.from_outside:
            return message
        if origin.door == DSN:
            return message  # built whole by feedback.dsn
        template = self.settings.feedback_id
        wanted = (b"message-id", b"date") if template is None else (b"message-id", b"date", b"feedback-id")
        if origin.user is None and origin.may_send_as is None and has_fields(message, wanted):
            return message  # the common case for a campaign tool: nothing to parse
        headers = read_headers(message)
        refusal = None
        if origin.may_send_as is not None:  # the API: the key's senders
            refusal = check_key_sender(origin.submitter, origin.may_send_as, incoming.sender, headers, self.domains)
        elif origin.user is not None:
            refusal = check_originators(origin.user, headers, self.domains)
        if refusal is not None:
            raise Refused(refusal)
        added = missing_headers(headers, self.settings.hostname)
        if template is not None:
            # Before DKIM signs it (step 7), which over-signs Feedback-ID.
            user = origin.user or incoming.sender.rpartition("@")[0]
            senders = from_addresses(headers)
            added += feedback_id(headers, template, user, domain_of(senders[0] if senders else incoming.sender))
        return added + message

    def _inbound_checks(self, message: bytes, incoming: Incoming, origin: Origin) -> bytes | Deferred[bytes]:
        """Authentication-Results: for mail from outside (or a DMARC refusal)."""
        settings = self.settings
        if not origin.from_outside or origin.role != "mx":
            return message
        if not settings.authenticate:
            return strip_forged_results(message, settings.hostname)
        deferred = self._run(partial(
            evaluate, hostname=settings.hostname, client_ip=origin.client_ip, helo=origin.helo,
            mail_from=incoming.sender, message=message, nameservers=settings.nameservers,
        ))

        def judged(verdict: Any) -> bytes:
            if settings.dmarc_reject and verdict.dmarc == "fail" and verdict.dmarc_policy == "reject":
                domain = from_domain(message) or "the From: domain"
                raise Refused(Reply(550, "5.7.1", f"Message refused: DMARC policy of {domain} is reject and it failed"))
            header = f"Authentication-Results: {verdict.header}\n".encode("utf-8")
            return header + strip_forged_results(message, settings.hostname)

        return deferred.addCallback(judged)

    def _recipients_and_bounces(self, message: bytes, incoming: Incoming, origin: Origin) -> Deferred[Receipt]:
        accepted: list[tuple[str, Resolution]] = []
        refused: list[tuple[str, Reply]] = []
        for address in incoming.recipients:
            resolution = incoming.resolved.get(address)
            if resolution is None:
                verdict = self._verdict_of_text(address, origin, incoming.sender)
                if not verdict.accepted:
                    refused.append((address, verdict.reply))
                    continue
                resolution = verdict.resolution
            accepted.append((address, resolution))
        queue_id = self.shard.new_queue_id()
        if not accepted:
            return succeed(Receipt(queue_id, 0, 0, refused))
        is_report = any(r.bounce_for for _, r in accepted) or (
            not incoming.sender and b"delivery-status" in message)
        # Complaints are taken from mail from outside only: a provider's feedback loop reaches
        # us by MX. A report from our own senders (a user, a relay-network host, sendmail, the
        # API) is delivered as ordinary mail and changes nothing: otherwise any of them could
        # put anyone on the unscoped list, which only the operator may (`mailhost suppress add`).
        is_complaint = origin.from_outside and is_feedback_report(message)
        unsubscribes = [Unsubscribe(*r.unsubscribe) for _, r in accepted if r.unsubscribe]
        message = self._list_unsubscribe(message, incoming, origin, accepted)

        def sign_and_commit(found: tuple[list[str], bool]) -> Deferred[Receipt]:
            suppressed, complained = found
            return self._commit(queue_id, message, incoming, origin, accepted, refused, suppressed, complained,
                                self._signing_key(message, origin))

        def reports(_: object = None) -> Deferred[Receipt]:
            if is_report or is_complaint:
                return self._run(self._record_reports, message, is_report, is_complaint).addCallback(sign_and_commit)
            return sign_and_commit(([], False))

        if unsubscribes:
            return self._run(self._record_unsubscribes, unsubscribes).addCallback(reports)
        return reports()

    def _verdict_of_text(self, address: str, origin: Origin, sender: str) -> RecipientVerdict:
        try:
            parsed, _ = parse_path(f"<{address}>", utf8=True, null_ok=False, kind="recipient")
        except SMTPError as e:
            return RecipientVerdict(e.reply)
        return self.recipient_verdict(parsed, origin, sender)

    def _signing_key(self, message: bytes, origin: Origin) -> DkimKey | None:
        """The DKIM key that signs this message (None: not signed): the From: domain's, and
        never for mail from outside. The signature is made on the disk thread that commits the
        message (store), so a message costs one thread trip, not two."""
        if origin.from_outside or not self.signer.has_keys():
            return None
        return self.signer.key_for(from_domain(message))

    def _list_unsubscribe(self, message: bytes, incoming: Incoming, origin: Origin,
                          accepted: list[tuple[str, Resolution]]) -> bytes:
        """List-Unsubscribe: and List-Unsubscribe-Post: (RFC 2369 3.2, RFC 8058 3.1) on mail
        from our own marketing senders (envelope sender or From:) that has none.

        The token names one recipient, so only a message to one recipient gets them: the
        same body goes to every recipient of a message, and a link for one would let the
        others unsubscribe them. Campaign tools send one message per recipient anyway."""
        settings, tokens = self.settings, self.unsubscribe
        if not settings.unsubscribe.add_headers or tokens is None or not origin.own_client or not incoming.sender:
            return message
        headers = read_headers(message)
        marketing = settings.unsubscribe.is_marketing
        if not (marketing(incoming.sender) or any(marketing(a) for a in from_addresses(headers))):
            return message
        if "list-unsubscribe" in headers.names():
            return message  # the sender's own (RFC 8058 asks for one only)
        if len(accepted) != 1 or accepted[0][1].bounce_for or accepted[0][1].unsubscribe:
            log.warn("no List-Unsubscribe added: mail from <{sender}> to {count} recipients (a token names one; "
                     "send one message per recipient)", sender=incoming.sender, count=len(accepted))
            return message
        sender_domain = domain_of(incoming.sender)
        mail_domain = sender_domain if self.domains.is_local(sender_domain) else self.domains.primary
        return list_unsubscribe_headers(tokens, settings.unsubscribe_url, accepted[0][0], incoming.sender,
                                        mail_domain) + message

    def _record_unsubscribes(self, requests: list[Unsubscribe]) -> None:
        """Mail to unsubscribe+TOKEN addresses: each recipient suppressed for its sender domain (a content thread)."""
        for request in requests:
            if record_unsubscribe(self.suppression, request, "mailto"):
                log.info("unsubscribed <{rcpt}> from mail of {scope} (mailto)", rcpt=request.recipient,
                         scope=request.scope)

    def _record_reports(self, message: bytes, bounces: bool, complaint: bool) -> tuple[list[str], bool]:
        """A report about our mail (a content thread): the recipients newly suppressed, and
        whether it was a complaint that was recorded."""
        suppressed = self._record_bounces(message) if bounces else []
        complained = self._record_complaint(message) if complaint else None
        if complained is None:
            return suppressed, False
        return suppressed + ([complained] if complained else []), True

    def _record_complaint(self, message: bytes) -> str | None:
        """An ARF report (RFC 5965): suppress the recipient who said "spam", for every sender,
        tell the event log and count it for the complaint rate. Returns the recipient when
        newly suppressed, "" when the report was taken but suppressed no one new, None when it
        is not a complaint about our mail."""
        complaint = parse_arf(message)
        if complaint is None:
            return None
        if not self._about_our_mail(complaint):
            log.info("complaint report about <{rcpt}> not taken: the original is not from our domains ({senders})",
                     rcpt=complaint.recipient, senders=", ".join(sorted(complaint.sender_domains)) or "none given")
            return None
        recipient = complaint.recipient
        existing = self.suppression.is_suppressed(recipient)
        if existing is not None and existing.source == "complaint":
            # Providers send a report again now and then; one complaint counts once.
            log.info("complaint about <{rcpt}> again ({agent}); already suppressed", rcpt=recipient,
                     agent=complaint.user_agent or "no user agent")
            return ""
        provider = provider_of(recipient)
        if existing is None:
            reason = f"complaint ({complaint.feedback_type}) via {complaint.user_agent or provider}"
            if complaint.message_id:
                reason += f" about <{complaint.message_id}>"
            self.suppression.add(recipient, "", reason, source="complaint", category="complaint")
        events = self.suppression.events
        if events is not None:
            events.record("complained", recipient=recipient, sender=complaint.sender, message_id=complaint.message_id,
                          feedback_type=complaint.feedback_type, user_agent=complaint.user_agent, provider=provider,
                          source_ip=complaint.source_ip, found_by=complaint.found_by)
        log.info("complaint: <{rcpt}> ({provider}) marked mail from {sender} <{msgid}> as {kind} via {agent}; "
                 "suppressed", rcpt=recipient, provider=provider, sender=complaint.sender or "?",
                 msgid=complaint.message_id, kind=complaint.feedback_type, agent=complaint.user_agent or "?")
        if self.complaint_rate is not None:
            self.complaint_rate.complained(recipient)
            self.complaint_rate.flush()
        return recipient if existing is None else ""

    def _about_our_mail(self, complaint: Complaint) -> bool:
        """Whether the original claims to be from us: its From: or envelope sender in one of
        our domains, or a domain we sign for. A complaint about someone else's mail must not
        stop ours. (A forger who names our domain gets as far as with a forged VERP bounce.)"""
        signs = self.signer.has_keys()
        return any(self.domains.is_local(d) or (signs and d in self.signer.keys) for d in complaint.sender_domains)

    def _record_bounces(self, message: bytes) -> list[str]:
        """A DSN about our mail: its failures go to the suppression list."""
        suppressed = []
        for report in parse_dsn(message):
            if self.suppression.is_suppressed(report.recipient) is None and self.suppression.record_bounce(report):
                suppressed.append(report.recipient)
                log.info("suppressed <{rcpt}>: {status} {diagnostic}", rcpt=report.recipient, status=report.status,
                         diagnostic=report.diagnostic)
        return suppressed

    def _commit(self, queue_id: str, message: bytes, incoming: Incoming, origin: Origin,
                accepted: list[tuple[str, Resolution]], refused: list[tuple[str, Reply]],
                suppressed: list[str], complained: bool = False, signing_key: DkimKey | None = None) -> Deferred[Receipt]:
        date = received_date()
        copies: list[Copy] = []
        remote: list[str] = []
        remote_dsn: dict[str, dict[str, Any]] = {}
        delivered: list[Recipient] = []  # local recipients who asked for NOTIFY=SUCCESS
        forwarded: list[str] = []  # what aliases send on to remote addresses (SRS, below)
        forwarding_domain = ""
        seen: set[str] = set()
        for address, resolution in accepted:
            if resolution.bounce_for:
                if self.settings.consume_bounces:
                    continue  # the suppression update is the delivery
                resolution = self.domains.resolve("postmaster", domain_of(address))
            elif complained and self.settings.consume_bounces and address_key(address) in self.settings.feedback_addresses:
                continue  # a complaint taken at a feedback-loop address: consumed like a VERP bounce
            if resolution.unsubscribe:
                continue  # consumed: the suppression update is the delivery
            for mailbox in resolution.mailboxes:
                if mailbox.address not in seen:
                    seen.add(mailbox.address)
                    headers = delivery_headers(incoming.sender, mailbox.address)
                    copies.append(Copy(mailbox, headers + self.received(origin, queue_id, address, date, incoming)))
            if resolution.mailboxes and "SUCCESS" in incoming.notify.get(address, ()):
                delivered.append(Recipient(address, state=DELIVERED, status="2.0.0", notify=["SUCCESS"],
                                           last_reply="delivered to the mailbox", orcpt=incoming.orcpt.get(address)))
            # What an alias of ours sends on to remote addresses is forwarded (SRS, below).
            alias = bool(resolution.remote) and self.domains.is_local(domain_of(address))
            if alias:
                forwarding_domain = forwarding_domain or domain_of(address)
            for r in resolution.remote:
                if r not in remote_dsn:
                    (forwarded if alias else remote).append(r)
                    remote_dsn[r] = incoming.recipient_dsn(address, r)
        srs_sender = self._srs_sender(incoming.sender, forwarding_domain) if forwarded else None
        if srs_sender is None:
            remote.extend(forwarded)
            forwarded = []
        envelope = None
        if remote:
            now = time.time()
            envelope = Envelope(id=queue_id, sender=incoming.sender,
                                recipients=[Recipient(r, **remote_dsn[r]) for r in remote],
                                arrival=now, next_attempt=now, client=origin.client,
                                body_8bit=incoming.body_8bit or not message.isascii(),
                                smtputf8=incoming.smtputf8 or not all(r.isascii() for r in remote),
                                ret=incoming.ret, envid=incoming.envid)
        receipt = Receipt(queue_id, len(copies), len(remote) + len(forwarded), refused, suppressed)
        only = remote[0] if len(remote) == 1 else None
        outbound_headers = self.received(origin, queue_id, only, date, incoming)

        def stored(_: object) -> Receipt:
            if self.traffic is not None:
                self.traffic.received()
            if envelope is not None:
                self.on_queued(envelope)
            if delivered and incoming.sender:
                self._report_delivered(queue_id, incoming, origin, delivered, message)
            return receipt

        if forwarded and srs_sender is not None:
            return self._commit_forwarded(srs_sender, [Recipient(r, **remote_dsn[r]) for r in forwarded], copies,
                                          envelope, outbound_headers, message, origin, date, incoming, receipt,
                                          signing_key).addCallback(stored)
        if not copies and envelope is None:
            return succeed(receipt)
        return self.store(copies, envelope, outbound_headers, message, signing_key).addCallback(stored)

    def _report_delivered(self, queue_id: str, incoming: Incoming, origin: Origin, delivered: list[Recipient],
                          message: bytes) -> None:
        """RFC 3461 NOTIFY=SUCCESS for local recipients: a "delivered" DSN once their copies are
        durable. The message's own 250 does not wait for it; a report that cannot be sent is logged."""
        now = time.time()
        envelope = Envelope(id=queue_id, sender=incoming.sender, recipients=delivered, arrival=now, next_attempt=now,
                            client=origin.client, ret=incoming.ret, envid=incoming.envid)
        try:
            report = build_dsn(envelope, delivered, message, hostname=self.settings.hostname, kind=DELIVERED_REPORT,
                               now=now)
        except ValueError as e:
            log.warn("{id}: no delivery notification for <{sender}>: {error}", id=queue_id, sender=incoming.sender,
                     error=str(e))
            return
        self.notify(incoming.sender, report).addCallbacks(
            lambda report_id: log.info("{id}: sender delivery notification: {report}", id=queue_id, report=report_id),
            lambda failure: log.failure("{id}: cannot send the delivery notification", failure, id=queue_id))

    # --- SRS for what aliases forward (feedback.srs) ---
    def _srs_sender(self, sender: str, domain: str) -> str | None:
        """The SRS return path for mail from `sender` forwarded by an alias of `domain`, or None
        to keep `sender`: a bounce (<>), a sender of ours (SPF passes already), SRS off, or an
        address that does not fit in an SRS local part (logged: SPF may fail at the destination)."""
        if self.srs is None or not self.settings.srs or not sender or self.domains.is_local(domain_of(sender)):
            return None
        rewritten = self.srs.forward(sender, domain)
        if rewritten is None:
            log.warn("forwarded mail from <{sender}> keeps its return path: it does not fit in an SRS address "
                     "(64 octets, no quoting)", sender=sender)
        return rewritten

    def _commit_forwarded(self, srs_sender: str, forwarded: list[Recipient], copies: list[Copy],
                          envelope: Envelope | None, outbound_headers: bytes, message: bytes, origin: Origin, date: str,
                          incoming: Incoming, receipt: Receipt, signing_key: DkimKey | None = None) -> Deferred[None]:
        """Commit with the forwarded recipients in an envelope of their own, from `srs_sender`:
        that envelope first, then the rest as usual; when the rest fails, the forwarded part is
        taken back, so the client's retry makes no second copy."""
        # The receipt's id when nothing else is queued; a second one beside the direct recipients'.
        queue_id = receipt.queue_id if envelope is None else self.shard.new_queue_id()
        now = time.time()
        addresses = [r.address for r in forwarded]
        srs_envelope = Envelope(id=queue_id, sender=srs_sender, recipients=forwarded,
                                arrival=now, next_attempt=now, client=origin.client,
                                body_8bit=incoming.body_8bit or not message.isascii(),
                                smtputf8=incoming.smtputf8 or not all(a.isascii() for a in addresses + [srs_sender]),
                                ret=incoming.ret, envid=incoming.envid)
        only = addresses[0] if len(addresses) == 1 else None
        log.info("{id}: forwarded by alias with return path <{srs}> (SRS) for <{sender}>", id=queue_id,
                 srs=srs_sender, sender=incoming.sender)

        def rest(_: object) -> Deferred[None] | None:
            if not copies and envelope is None:
                return None
            return self.store(copies, envelope, outbound_headers, message, signing_key).addErrback(take_back)

        def take_back(failure: Any) -> Deferred[Any]:
            return self._writer.run(self._spool.remove, queue_id).addBoth(lambda _: failure)

        headers = self.received(origin, queue_id, only, date, incoming)
        return self.store([], srs_envelope, headers, message, signing_key).addCallback(rest).addCallback(
            lambda _: self.on_queued(srs_envelope))
    # --- end SRS ---

    def store(self, copies: list[Copy], envelope: Envelope | None, outbound_headers: bytes, body: bytes,
              signing_key: DkimKey | None = None) -> Deferred[None]:
        """DKIM-sign `body` with `signing_key` (None: as it is), deliver `copies` locally and
        queue `envelope` (None: nothing remote); every part or none, in one disk thread trip.

        The queued message is `outbound_headers` (our Received:) followed by the signed body."""
        if not copies and envelope is None:
            return succeed(None)
        if copies:
            # Local copies are fsync'd file by file, concurrent deliveries in parallel threads,
            # whose fsyncs the journal commits together. Two syncs of the whole file system a
            # batch (each also writing back the log and whatever else waits) measured slower for
            # inbound mail: inbound.py, 1 session, 0.79x Postfix's rate with fsyncs, 0.68x so.
            return self._writer.run(_commit, self._spool, copies, envelope, outbound_headers, body, signing_key)
        # Queued only (a campaign's mail): committed with the messages arriving meanwhile, two
        # file system syncs for the batch, each 250 after them (ops.durable.GroupSync).
        if self._group is None:
            self._group = GroupSync(self._writer.run, self._spool.root)
        return self._group.submit(partial(_stage, self._spool, envelope, outbound_headers, body, signing_key))

    def received(self, origin: Origin, queue_id: str, recipient: str | None, date: str, incoming: Incoming) -> bytes:
        """Our RFC 5321 4.4 trace header; `for` only when it names one recipient.

        The protocol is named as RFC 3848 / RFC 6531 do (ESMTPSA: TLS and AUTH); an
        authenticated user is named in a comment, and with [submission] hide_client
        the "from" part (client address and HELO name) is left out."""
        hostname = self.settings.hostname
        for_clause = f"\n\tfor <{recipient}>" if recipient else ""
        if origin.door != SMTP:
            source = f"from {_header_safe(origin.submitter)}\n\t" if origin.submitter else ""
            return f"Received: {source}by {hostname} (mailhost) id {queue_id}{for_clause}; {date}\n".encode("utf-8")
        protocol = ("UTF8SMTP" if incoming.smtputf8 else "ESMTP" if origin.esmtp else "SMTP")
        protocol += ("S" if origin.tls else "") + ("A" if origin.user is not None else "")
        comments = f"\n\t(using {origin.tls})" if origin.tls else ""
        if origin.user is not None:
            comments += f"\n\t(authenticated as {origin.user})"
        by = f"by {hostname} (mailhost) with {protocol} id {queue_id}"
        if origin.user is not None and self.settings.hide_client:
            return f"Received: {by}{comments}{for_clause}; {date}\n".encode("utf-8")
        literal = f"IPv6:{origin.client_ip}" if ":" in origin.client_ip else origin.client_ip
        return f"Received: from {origin.helo} ([{literal}]){comments}\n\t{by}{for_clause}; {date}\n".encode("utf-8")


def _header_safe(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def signed_body(body: bytes, signing_key: DkimKey | None) -> bytes:
    """`body` with its DKIM-Signature: on top (RFC 6376 5), or as it is without a key. Blocking:
    the signature is made on the thread that stores the message."""
    return body if signing_key is None else sign(body, signing_key) + body


def _stage(spool: Spool, envelope: Envelope, outbound_headers: bytes, body: bytes,
           signing_key: DkimKey | None) -> Staged:
    """Sign, then write the queued message under temporary names (a GroupSync batch puts it in
    place once it is durable)."""
    return spool.stage(envelope, (outbound_headers, signed_body(body, signing_key)))


def _commit(spool: Spool, copies: list[Copy], envelope: Envelope | None, outbound_headers: bytes, body: bytes,
            signing_key: DkimKey | None = None) -> None:
    body = signed_body(body, signing_key)
    if envelope is not None:
        spool.store(envelope, (outbound_headers, body))
    if copies:
        try:
            deliver_copies(copies, body)
        except BaseException:
            # The client will be told 451 and send again: take the queued part back.
            if envelope is not None:
                spool.remove(envelope.id)
            raise
