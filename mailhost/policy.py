"""Who may send what to whom: the RCPT decision in one place.

Today mailhost delivers only to its own domains; relaying to other domains
arrives with the outbound queue. The rules here already refuse the classic
relay tricks: `%` and `!` in a local part are just characters of a local
name, an address literal is never local, and source routes were dropped by
the codec before this sees the address.
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


def check_recipient(address: Address, domains: LocalDomains) -> RecipientVerdict:
    """Accept a recipient in a local domain that names someone; refuse the rest."""
    rcpt = f"<{address}>"
    if address.domain.startswith("[") or not domains.is_local(address.domain):
        return RecipientVerdict(Reply(554, "5.7.1", f"{rcpt}: Relay access denied"))
    resolution = domains.resolve(address.bare_local, address.domain)
    if not resolution.found:
        return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: no such user here"))
    if resolution.remote:
        # An alias that forwards off-site needs the outbound queue, which this
        # version does not have: refuse rather than deliver half of it.
        return RecipientVerdict(
            Reply(550, "5.7.1", f"{rcpt}: Alias forwards to remote addresses; relaying is not available here")
        )
    return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok"), resolution)
