"""The one way a message enters mailhost: local copies into Maildir, remote
recipients into the spool, all durable before the caller may say 250.

The SMTP server hands over what it resolved at RCPT time (`accept`); bounces
and other messages mailhost writes itself come through `inject`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from email.utils import formatdate

from twisted.internet.defer import Deferred

from mailhost.feedback.dsn import received_count
from mailhost.ops.durable import DiskWriter
from mailhost.queue.envelope import Envelope, Recipient
from mailhost.local.mailbox import Copy, LocalDomains, deliver_copies
from mailhost.multiproc.shard import new_queue_id
from mailhost.queue.spool import Spool

def received_date() -> str:
    """The RFC 5322 date for a Received: line, made once a second (formatdate is slow)."""
    return _date_of_second(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_of_second(second: int) -> str:
    return formatdate(second, localtime=True)


HOP_LIMIT = 50  # Received: headers; more means a mail loop (RFC 5321 6.3)


def too_many_hops(message: bytes) -> bool:
    """More Received: fields than HOP_LIMIT (RFC 5321 6.3: a mail loop). The word's count up
    to the first empty line is an upper bound that settles the usual case without parsing the
    header block."""
    ends = [at for at in (message.find(b"\n\n"), message.find(b"\n\r\n")) if at >= 0]
    head = message[: min(ends) + 1] if ends else message
    if head.lower().count(b"received") <= HOP_LIMIT:
        return False
    return received_count(message) > HOP_LIMIT


def delivery_headers(sender: str, mailbox: str) -> bytes:
    """The header lines a local copy gets on top: who the envelope said, and for whom."""
    return f"Return-Path: <{sender}>\nDelivered-To: {mailbox}\n".encode("utf-8")


class Intake:
    def __init__(self, writer: DiskWriter, spool: Spool, domains: LocalDomains, hostname: str,
                 on_queued: Callable[[Envelope], None]) -> None:
        self._writer = writer
        self._spool = spool
        self._domains = domains
        self._hostname = hostname
        self.on_queued = on_queued

    def accept(self, copies: list[Copy], envelope: Envelope | None, outbound_headers: bytes, body: bytes) -> Deferred[None]:
        """Deliver `copies` locally and queue `envelope` (None: nothing remote); every part or none.

        The queued message is `outbound_headers` (our Received:) followed by `body`.
        """
        deferred = self._writer.run(_commit, self._spool, copies, envelope, outbound_headers, body)
        if envelope is not None:
            deferred.addCallback(lambda _: self.on_queued(envelope))
        return deferred

    def inject(self, sender: str, recipients: list[str], message: bytes, received_from: str = "") -> Deferred[str]:
        """A message from inside this host (a DSN, `mailhost sendmail`): resolve,
        deliver or queue; fires with its id. Unknown local recipients are skipped
        (the caller checks them first)."""
        queue_id = new_queue_id()
        origin = f"{received_from}\n\t" if received_from else ""
        received = (
            f"Received: {origin}by {self._hostname} (mailhost) id {queue_id}; {received_date()}\n"
        ).encode("utf-8")
        copies: list[Copy] = []
        remote: list[str] = []
        for address in recipients:
            local, _, domain = address.rpartition("@")
            if self._domains.is_local(domain):
                resolution = self._domains.resolve(local, domain)
                for mailbox in resolution.mailboxes:
                    if all(c.mailbox != mailbox for c in copies):
                        copies.append(Copy(mailbox, delivery_headers(sender, mailbox.address) + received))
                remote.extend(resolution.remote)
            else:
                remote.append(address)
        envelope = None
        if remote:
            now = time.time()
            envelope = Envelope(queue_id, sender, [Recipient(r) for r in dict.fromkeys(remote)], now, now,
                                client=f"mailhost ({self._hostname})", body_8bit=not message.isascii(),
                                smtputf8=not all(r.isascii() for r in remote))
        return self.accept(copies, envelope, received, message).addCallback(lambda _: queue_id)


def _commit(spool: Spool, copies: list[Copy], envelope: Envelope | None, outbound_headers: bytes, body: bytes) -> None:
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
