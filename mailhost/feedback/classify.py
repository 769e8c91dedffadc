"""What a refusal means: one classifier for the replies our own deliveries get and for
the reports that come back by mail (DSNs).

`classify_reply` gives one of config.BOUNCE_CLASSES. It tries, in order:

1. the operator's `[[bounce_rule]]`s (a regex searched in "code status text");
2. built-in rules for the big providers' documented replies (below, each with its
   source), and for wording that every MTA uses ("user unknown", "over quota",
   "blocked using zen.spamhaus.org");
3. the RFC 3463 subject and detail codes of the status, as a fallback;
4. "other".

What each class does (`suppression_effect`, and delivery/): only an invalid recipient
suppresses at once; a full or inactive mailbox counts towards [bounces] soft_limit;
a policy, authentication or content block says the address is fine and the sender is
not (RFC 3463 3.8): it never suppresses anyone, it pauses the destination instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailhost.config import BounceRule

HARD = "hard"
SOFT = "soft"

INVALID_RECIPIENT = "invalid_recipient"
MAILBOX_FULL = "mailbox_full"
POLICY = "policy"
AUTHENTICATION = "authentication"
CONTENT = "content"
RATE_LIMIT = "rate_limit"
TOO_LARGE = "too_large"
ROUTING = "routing"
TLS = "tls"
OTHER = "other"

# A refusal of these classes is about us (our IP, our domain's authentication, our
# content), not the recipient: the whole destination group waits (delivery/throttle.py).
BLOCKING = frozenset({POLICY, AUTHENTICATION, CONTENT})

# A status code inside a text, not part of an IP address or a version number.
_STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")


def _rule(pattern: str) -> re.Pattern[str]:
    # {S} and {E} fence a status code the way _STATUS_IN_TEXT does.
    return re.compile(pattern.replace("{S}", r"(?<![\d.])").replace("{E}", r"(?!\.?\d)"), re.IGNORECASE)


# Built-in rules, first match wins: provider codes before generic wording, and listing or
# reputation wording before "spam" (a Spamhaus listing and Gmail's reputation block both
# say "spam", and neither is about the message's content).
_BUILT_IN: tuple[tuple[re.Pattern[str], str], ...] = (
    # Sender addresses (RFC 3463 3.2: x.1.7 bad sender mailbox syntax, x.1.8 bad sender's
    # system address): our sender is refused, the recipient is fine.
    (_rule(r"{S}[45]\.1\.[78]{E}|sender address rejected|sender domain (?:does not exist|not found|unknown)"), POLICY),
    # Greylisting ("450 4.2.0 <x>: Recipient address rejected: Greylisted"): a first try, nothing more.
    (_rule(r"greylist|graylist"), OTHER),
    # Gmail, "SMTP error reference" (support.google.com/a/answer/3726730):
    # 421 4.7.28 "... unusual rate of unsolicited mail originating from your IP/DKIM domain ...
    # temporarily rate limited"; 4.7.0 "unusual rate of unsolicited mail ... temporarily blocked".
    (_rule(r"{S}4\.7\.28{E}|unusual rate of unsolicited mail"), RATE_LIMIT),
    # 450 4.2.1 "The user you are trying to contact is receiving mail too quickly / at a rate that
    # prevents additional messages from being delivered"; "Peak SMTP relay limit exceeded".
    (_rule(r"receiving mail (?:too quickly|at a rate)|relay limit exceeded"), RATE_LIMIT),
    # 5.7.26 "This mail has been blocked because the sender is unauthenticated" / "Unauthenticated
    # email from X is not accepted due to domain's DMARC policy"; 5.7.27 SPF; 5.7.30-32 DKIM,
    # SPF or DMARC alignment (Gmail's 2024 sender requirements); 4.7.23-27 the same, for now.
    (_rule(r"{S}[45]\.7\.(?:2[3-7]|3[0-2]){E}"), AUTHENTICATION),
    # Gmail 550 5.2.1 "The email account that you tried to reach is inactive / disabled":
    # the address exists but takes no mail now (soft, like a full mailbox).
    (_rule(r"account that you tried to reach is (?:inactive|disabled)|mailbox (?:is )?(?:disabled|inactive)"
           r"|account (?:has been )?disabled|inactive (?:user|account|mailbox)"), MAILBOX_FULL),
    # Microsoft, "Email non-delivery reports and SMTP errors in Exchange Online"
    # (learn.microsoft.com/exchange/mail-flow-best-practices/non-delivery-reports-in-exchange-online):
    # 550 5.7.515 "Access denied, sending domain X doesn't meet the required authentication level".
    (_rule(r"{S}5\.7\.515{E}|required authentication level"), AUTHENTICATION),
    # 550 5.7.606-649 "Access denied, banned sending IP [x]" (the tenant's or Microsoft's block
    # list); 5.7.708 "traffic not accepted from this IP"; outlook.com's "part of their network is
    # on our block list (S3150)" and its S3xxx siblings.
    (_rule(r"{S}5\.7\.(?:6(?:0[6-9]|[1-4]\d)|70[58]){E}|banned sending ip|\(?\bA?S3\d{3}\)?|block ?list"), POLICY),
    # 451 4.7.500-699 "Server busy, please try again later" (AS...): Exchange Online's rate limit;
    # 4.7.650 "temporarily rate limited due to IP reputation".
    (_rule(r"{S}4\.7\.[56]\d\d{E}|server busy"), RATE_LIMIT),
    # Yahoo, "SMTP error codes" (senders.yahooinc.com/smtp-error-codes): 421 4.7.0 [TSS04]
    # "Messages from x temporarily deferred due to unexpected volume or user complaints" (and
    # the older TS01-TS03): a deferral, retry later at a lower rate.
    (_rule(r"\[TSS?0[1-4]\]|temporarily deferred due to (?:unexpected volume|user complaints)"), RATE_LIMIT),
    # 553 5.7.x [TSS09] / [TSS11] "All messages from x will be permanently deferred"; [BL21] etc.:
    # the IP is blocked; [CS01] "Message rejected due to local policy" is about content.
    (_rule(r"\[CS0\d\]"), CONTENT),
    (_rule(r"\[TSS?(?:0[5-9]|1\d)\]|\[BL\d\d\]|permanently deferred"), POLICY),
    # DNS block lists and reputation: Spamhaus ("... blocked using zen.spamhaus.org"), Barracuda
    # ("Service unavailable; Client host [x] blocked using Barracuda Reputation"), SpamCop, SORBS.
    (_rule(r"spamhaus|barracuda|spamcop|sorbs|blocked using|\b(?:rbl|dnsbl|rbldns)\b|black ?list|listed (?:at|on|in)\b"
           r"|client host (?:\[[^]]*\] )?(?:rejected|blocked)"), POLICY),
    # Gmail 550 5.7.1 "... likely suspicious due to the very low reputation of the sending IP
    # address / domain"; "The IP you're using to send mail is not authorized to send email
    # directly to our servers"; "IP not in whitelist for RCPT domain".
    (_rule(r"reputation|not authorized to send|not in whitelist|poor sender|sender (?:is )?blocked"), POLICY),
    # Authentication wording: SPF, DKIM, DMARC, reverse DNS (RFC 7372's x.7.25).
    (_rule(r"\bdmarc\b|\bdkim\b|\bspf\b|unauthenticated|authentication (?:check|failure|required)|reverse dns|\bptr\b"),
     AUTHENTICATION),
    # The recipient's address: wording of Gmail ("The email account that you tried to reach does
    # not exist"), Microsoft ("5.4.1 Recipient address rejected: Access denied", "5.5.0
    # Requested action not taken: mailbox unavailable"), Yahoo ("dd This user doesn't have a
    # yahoo.com account", "552 1 Requested mail action aborted, mailbox not found"), Postfix,
    # Exim, qmail.
    (_rule(r"user unknown|unknown (?:user|recipient|mailbox|address)|no such (?:user|mailbox|recipient|account|address)"
           r"|(?:account|address|user|mailbox|recipient)[^.;,]{0,40}(?:does ?n[o']t exist|not exist|not found)"
           r"|doesn't have a [\w.-]+ account|recipient address rejected: access denied|mailbox unavailable|invalid (?:recipient|mailbox)"
           r"|address (?:is )?invalid|unrouteable address|no mailbox here"), INVALID_RECIPIENT),
    # Full mailboxes: "452 4.2.2 The recipient's inbox is out of storage space", "over quota",
    # "mailbox full", "quota exceeded", "insufficient storage".
    (_rule(r"over ?quota|quota exceeded|exceeded (?:the|its|their)? ?(?:storage|quota)|mailbox (?:is )?full"
           r"|out of storage|insufficient (?:system )?storage|storage (?:space|allocation)"), MAILBOX_FULL),
    # Size: Gmail 552 5.3.4 "Your message exceeded Google's message size limits".
    (_rule(r"message size|too (?:large|big)|size limit|exceeds? (?:the )?(?:maximum )?(?:message )?size"), TOO_LARGE),
    (_rule(r"starttls|\btls\b|encryption (?:needed|required)|certificate"), TLS),
    # Content: Gmail 550 5.7.1 "... likely unsolicited mail" / "... potential security issue",
    # virus scanners, content filters.
    (_rule(r"\bspam\b|unsolicited|virus|malware|phish|suspicious|content|attachment|\bUCE\b|bulk mail"), CONTENT),
    (_rule(r"rate limit|too many (?:messages|connections|emails|mails)|throttl|slow down|try again later"), RATE_LIMIT),
)


def _by_status(status: str, code: int | None) -> str:
    """RFC 3463 subject and detail codes (with RFC 5248's registry additions)."""
    match = _STATUS_IN_TEXT.fullmatch(status)
    if match is None:
        return OTHER
    klass, subject, detail = match.groups()
    if subject == "1":  # 3.2 addressing
        # x.1.1 bad mailbox, x.1.2 bad system (domain), x.1.3 bad syntax, x.1.6 moved,
        # x.1.10 null MX (RFC 7505 4.2)
        return INVALID_RECIPIENT if detail in ("1", "2", "3", "6", "10") else POLICY if detail in ("7", "8") else OTHER
    if subject == "2":  # 3.3 mailbox status
        # x.2.1 disabled, x.2.2 full, x.2.3 message too long for the mailbox
        return {"1": MAILBOX_FULL, "2": MAILBOX_FULL, "3": TOO_LARGE}.get(detail, OTHER)
    if subject == "3":  # 3.4 mail system status: x.3.4 message too big for the system
        return TOO_LARGE if detail == "4" else OTHER
    if subject == "4":  # 3.5 network and routing
        return ROUTING
    if subject == "5":  # 3.6 protocol
        return OTHER
    if subject == "6":  # 3.7 message content or media
        return CONTENT
    if subject == "7":  # 3.8 security or policy status
        if detail in ("5", "10", "11"):  # cryptographic failure, encryption needed (RFC 5248)
            return TLS
        if detail in ("23", "24", "25", "26", "27"):  # RFC 7372: SPF, reverse DNS, multiple auth checks
            return AUTHENTICATION
        if klass == "4" and (code == 421 or detail == "0"):
            return RATE_LIMIT  # "421 4.7.0 try again later": the receiver wants less, now
        return POLICY
    return OTHER


def classify_reply(status: str, text: str, code: int | None = None, rules: Iterable[BounceRule] = ()) -> str:
    """The bounce class (config.BOUNCE_CLASSES) of a refusal: `status` its x.y.z code ("" when
    none), `text` the reply or Diagnostic-Code text, `code` the SMTP reply code when known."""
    status = (status or "").strip()
    text = text or ""
    subject = " ".join(part for part in (str(code) if code else "", status, text) if part)
    for rule in rules:
        if rule.pattern.search(subject):
            return rule.category
    for pattern, category in _BUILT_IN:
        if pattern.search(subject):
            return category
    if not status:
        found = _STATUS_IN_TEXT.search(text)
        status = ".".join(found.groups()) if found else ""
    return _by_status(status, code)


def suppression_effect(category: str, permanent: bool) -> str | None:
    """HARD (suppress now), SOFT (count towards [bounces] soft_limit), or None: this class of
    failure says nothing against the address. An unknown user only suppresses at once when the
    failure is permanent (a 4xx "user unknown" is often a directory that is not ready yet)."""
    if category == INVALID_RECIPIENT:
        return HARD if permanent else SOFT
    if category == MAILBOX_FULL:
        return SOFT
    return None
