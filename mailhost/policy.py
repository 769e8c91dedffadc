"""Who may send what to whom: the RCPT decision in one place.

Relaying (to a domain that is not ours) is allowed only to clients that may
relay: on the mx role, those in relay.networks. `%` and `!` in a local part
are just characters of a local name (never routed), an address literal is
never one of our domains and is never routed, and source routes were dropped
by the codec before this sees the address.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhost.mailbox import LocalDomains, Resolution
from mailhost.smtp.wire import Address, Reply


@dataclass(frozen=True)
class RecipientVerdict:
    """The RCPT reply and, when accepted, where the mail goes."""

    reply: Reply
    resolution: Resolution | None = None

    @property
    def accepted(self) -> bool:
        return self.resolution is not None


def check_recipient(address: Address, domains: LocalDomains, may_relay: bool = False) -> RecipientVerdict:
    """Accept a recipient in a local domain that names someone, or a remote
    one from a client that may relay; refuse the rest."""
    rcpt = f"<{address}>"
    if address.domain.startswith("["):
        if may_relay:
            return RecipientVerdict(Reply(550, "5.1.2", f"{rcpt}: Address literals are not routed"))
        return RecipientVerdict(Reply(554, "5.7.1", f"{rcpt}: Relay access denied"))
    if not domains.is_local(address.domain):
        if not may_relay:
            return RecipientVerdict(Reply(554, "5.7.1", f"{rcpt}: Relay access denied"))
        return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok"), Resolution(remote=[str(address)]))
    resolution = domains.resolve(address.bare_local, address.domain)
    if not resolution.found:
        return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: no such user here"))
    return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok"), resolution)
