"""Who may send what to whom, in one place: the relay decision, AUTH on the
submission roles, the RCPT decision and sender ownership.

Relaying (to a domain that is not ours) is allowed only to clients that may
relay: authenticated users (the submission roles) and, on the mx role, those in
relay.networks. `%` and `!` in a local part are just characters of a local
name (never routed), an address literal is never one of our domains and is
never routed, and source routes were dropped by the codec before this sees the
address.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhost.feedback.suppression import SuppressionList, address_key, verp_recipient
from mailhost.feedback.unsubscribe import MAILTO_PREFIX, UnsubscribeTokens, is_mailto_address
from mailhost.intake.origin import SMTP, Origin
from mailhost.feedback.srs import Srs, is_srs
from mailhost.local.mailbox import LocalDomains, Resolution
from mailhost.message import (ORIGINATOR_FIELDS, HeaderField, HeaderSection, claimed_addresses, normalize_address,
                              split_address)
from mailhost.smtp.wire import Address, Reply

SUBMISSION_ROLES = ("submission", "submissions")


def may_relay(role: str, authenticated: bool, in_relay_networks: bool) -> bool:
    """Whether a session may send to other domains."""
    if authenticated:
        return True
    return role == "mx" and in_relay_networks


def auth_required(role: str, authenticated: bool, tls: bool) -> Reply | None:
    """530 for a submission session that wants to send before AUTH (RFC 4954 6); None when it may go on."""
    if role not in SUBMISSION_ROLES or authenticated:
        return None
    return Reply(530, "5.7.0", "Authentication required" + ("" if tls else " (STARTTLS first)"))


@dataclass(frozen=True)
class RecipientVerdict:
    """The RCPT reply and, when accepted, where the mail goes."""

    reply: Reply
    resolution: Resolution | None = None

    @property
    def accepted(self) -> bool:
        return self.resolution is not None


def check_recipient(address: Address, domains: LocalDomains, may_relay: bool = False, verp: bool = False,
                    unsubscribe: UnsubscribeTokens | None = None, feedback: tuple[str, ...] = (),
                    srs: Srs | None = None) -> RecipientVerdict:
    """Accept a recipient in a local domain that names someone (or, with VERP
    on, a bounces+... return address, an unsubscribe+TOKEN address with a valid
    token, an SRS return path of ours that verifies, or one of the `feedback`
    addresses where complaint reports arrive), or a remote one from a client that
    may relay; refuse the rest."""
    rcpt = f"<{address}>"
    if address.domain.startswith("["):
        if may_relay:
            return RecipientVerdict(Reply(550, "5.1.2", f"{rcpt}: Address literals are not routed"))
        return RecipientVerdict(Reply(554, "5.7.1", f"{rcpt}: Relay access denied"))
    if not domains.is_local(address.domain):
        if not may_relay:
            return RecipientVerdict(Reply(554, "5.7.1", f"{rcpt}: Relay access denied"))
        return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok"), Resolution(remote=[str(address)]))
    if verp and (about := verp_recipient(address.bare_local)) is not None:
        return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Bounce address ok"), Resolution(bounce_for=about))
    if unsubscribe is not None and is_mailto_address(address.bare_local):
        # RFC 8058 / RFC 2369 mailto form: consumed by the intake, never a mailbox, even with a catch-all.
        request = unsubscribe.verify(address.bare_local[len(MAILTO_PREFIX):], mail_domain=address.domain)
        if request is None:
            return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: not a valid "
                                                        "unsubscribe address"))
        return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Unsubscribe address ok"),
                                Resolution(unsubscribe=(request.recipient, request.scope)))
    if srs is not None and is_srs(address.bare_local):
        return srs_verdict(address, domains, srs)
    resolution = domains.resolve(address.bare_local, address.domain)
    if not resolution.found and address_key(f"{address.bare_local}@{address.domain}") in feedback:
        # A feedback-loop address needs no mailbox: what is not consumed as a complaint
        # (a provider's sign-up confirmation, say) goes to postmaster.
        resolution = domains.resolve("postmaster", address.domain)
    if not resolution.found:
        return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: no such user here"))
    return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok"), resolution)


def srs_verdict(address: Address, domains: LocalDomains, srs: Srs) -> RecipientVerdict:
    """An SRS0/SRS1 address at one of our domains: relayed to the original sender (or the
    first forwarder) from anyone, since only we can make one that verifies; forged, garbled
    or expired ones get 550 5.1.1 (as postsrsd's "no such user"), never a mailbox or a
    catch-all."""
    rcpt = f"<{address}>"
    original = srs.reverse(address.bare_local)
    if original is None:
        return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: not a valid SRS "
                                                    "address (forged or expired)"))
    local, _, domain = original.rpartition("@")
    if domains.is_local(domain):  # a sender of ours (written before it was ours, or by another forwarder)
        resolution = domains.resolve(local, domain)
        if not resolution.found:
            return RecipientVerdict(Reply(550, "5.1.1", f"{rcpt}: Recipient address rejected: no such user here"))
    else:
        resolution = Resolution(remote=[original])
    return RecipientVerdict(Reply(250, "2.1.5", f"{rcpt}: Recipient ok (SRS)"), resolution)


def check_suppressed(resolution: Resolution, suppression: SuppressionList, sender: str = "") -> Reply | None:
    """550 5.1.1 for a relayed recipient on the suppression list (for every sender, or for
    `sender`'s domain), with why and since when."""
    for address in resolution.remote:
        entry = suppression.is_suppressed(address, sender)
        if entry is not None:
            what = entry.status or {"unsubscribe": "unsubscribed"}.get(entry.source, entry.source or "bounced")
            return Reply(550, "5.1.1", f"<{address}>: Recipient suppressed ({what} on "
                                       f"{entry.date[:10]}: {entry.reason[:120]}); `mailhost suppress remove` to undo")
    return None


def recipient_verdict(address: Address, origin: Origin, domains: LocalDomains, suppression: SuppressionList,
                      verp: bool = False, sender: str = "", unsubscribe: UnsubscribeTokens | None = None,
                      feedback: tuple[str, ...] = (), srs: Srs | None = None) -> RecipientVerdict:
    """The whole RCPT decision for a message from `origin`: who it may reach, then the
    suppression list for our own senders' mail (never for mail from outside or our DSNs).
    `unsubscribe`: the tokens that unsubscribe+TOKEN addresses are checked with; `srs`:
    what SRS addresses are verified with (None: they are ordinary local parts)."""
    relay = origin.user is not None or origin.relay_network or origin.door != SMTP
    verdict = check_recipient(address, domains, relay, verp=verp, unsubscribe=unsubscribe, feedback=feedback, srs=srs)
    if verdict.accepted and origin.own_client:
        suppressed = check_suppressed(verdict.resolution, suppression, sender)
        if suppressed is not None:
            return RecipientVerdict(suppressed)
    return verdict


def owns(user: str, address: str, domains: LocalDomains) -> bool:
    """Whether authenticated `user` may use `address` as its sender.

    Its own address, its plus-addresses, the aliases that reach its mailbox
    (not a catch-all), and what its users-file entry lists in may_send_as.
    """
    address = normalize_address(address).lower()
    user = user.lower()
    if address == user:
        return True
    local, domain = split_address(address)
    if not domain or not local:
        return False
    if domains.is_local(domain):
        resolution = domains.resolve(local, domain, catch_all=False)
        if any(mailbox.address == user for mailbox in resolution.mailboxes):
            return True
    entry = domains.user(user)
    allowed = entry.may_send_as if entry is not None else ()
    return address in allowed or f"@{domain}" in allowed


def check_sender(user: str, sender: Address, domains: LocalDomains) -> Reply | None:
    """MAIL FROM of an authenticated session: None when `user` owns it (or it is <>), else 553 5.7.1."""
    if sender.is_null or owns(user, f"{sender.bare_local}@{sender.domain}", domains):
        return None
    return Reply(553, "5.7.1", f"<{sender}>: Sender address not owned by {user}")


def check_header_senders(user: str, addresses: list[str], domains: LocalDomains, field: str = "From",
                         allowed: tuple[str, ...] | None = None) -> Reply | None:
    """Addresses an authenticated session's message names in its `field:` header: those in a
    local domain must be `user`'s. Compared normalised: "bob@Example.TEST." is bob@example.test.
    With `allowed` (an API key's senders), every address, in any domain, must be one of them."""
    for address in addresses:
        address = normalize_address(address)
        if allowed is not None:
            if not key_may_send_as(allowed, address):
                return Reply(553, "5.7.1", f"{field}: <{_printable(address)}> not allowed for {user}")
        elif domains.is_local(split_address(address)[1]) and not owns(user, address, domains):
            return Reply(553, "5.7.1", f"{field}: <{_printable(address)}> not owned by {user}")
    return None


def key_may_send_as(allowed: tuple[str, ...], address: str) -> bool:
    """Whether an API key whose senders are `allowed` ("news@example.test", "@example.test",
    lower case) may use `address`; the null sender and a bare name never."""
    address = normalize_address(address).lower()
    local, domain = split_address(address)
    if not local or not domain:
        return False
    return address in allowed or f"@{domain}" in allowed


def check_key_sender(name: str, allowed: tuple[str, ...], sender: str, headers: HeaderSection,
                     domains: LocalDomains) -> Reply | None:
    """Mail from the API (intake, step 3): the envelope sender and every originator field
    name only the key's `allowed` senders (553 5.7.1), and the header section reads one way."""
    if not key_may_send_as(allowed, sender):
        return Reply(553, "5.7.1", f"<{_printable(sender)}>: Sender address not allowed for {name}")
    return check_originators(name, headers, domains, allowed)


def check_originators(user: str, headers: HeaderSection, domains: LocalDomains,
                      allowed: tuple[str, ...] | None = None) -> Reply | None:
    """The header section of an authenticated user's message: every originator field (From:,
    Sender:, Resent-From:, Resent-Sender:) names only addresses `user` owns (553 5.7.1), and
    the section reads one way only (550 5.6.0): a reader must not see a sender we did not.

    550 5.6.0 is what Postfix's cleanup answers for a header it will not take (its MIME
    errors; RFC 3463: "other or undefined media error"). Mail from outside is never refused
    for this: the check protects our users' addresses, and other hosts' mail is theirs.
    """
    unreadable: HeaderField | None = None
    for field in headers.fields:
        if field.name.lower() not in ORIGINATOR_FIELDS:
            continue
        addresses, readable = claimed_addresses(field.text)
        refusal = check_header_senders(user, addresses, domains, field.name, allowed)
        if refusal is not None:
            return refusal  # the sharper reason first
        if not readable and unreadable is None:
            unreadable = field
    if headers.malformed:
        return Reply(550, "5.6.0", f"Malformed header section: {headers.malformed[0]} (RFC 5322 2.2)")
    if unreadable is not None:
        return Reply(550, "5.6.0", f"Malformed header section: the {unreadable.name}: field on line "
                                   f"{unreadable.line} is not a list of addresses (RFC 5322 3.4)")
    return None


def _printable(text: str) -> str:
    """`text` fit for a reply line, and not too long for one."""
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= 200 else shown[:200] + "..."
