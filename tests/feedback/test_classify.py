"""The bounce classifier (mailhost.feedback.classify): the big providers' documented replies,
wording every MTA uses, the RFC 3463 fallback, and [[bounce_rule]]s that override them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhost.config import BOUNCE_CLASSES, BounceRule
from mailhost.feedback.classify import HARD, SOFT, classify_reply, suppression_effect

REPLIES = [
    # Gmail (support.google.com/a/answer/3726730)
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the "
                   "recipient's email address for typos or unnecessary spaces. - gsmtp", "invalid_recipient"),
    (550, "5.2.1", "The email account that you tried to reach is inactive. - gsmtp", "mailbox_full"),
    (552, "5.2.2", "The recipient's inbox is out of storage space. - gsmtp", "mailbox_full"),
    (452, "4.2.2", "The email account that you tried to reach is over quota. - gsmtp", "mailbox_full"),
    (450, "4.2.1", "The user you are trying to contact is receiving mail too quickly. Please resend your message "
                   "at a later time. - gsmtp", "rate_limit"),
    (552, "5.3.4", "Your message exceeded Google's message size limits. - gsmtp", "too_large"),
    (550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders "
                    "to authenticate with either SPF or DKIM. - gsmtp", "authentication"),
    (550, "5.7.26", "Unauthenticated email from example.org is not accepted due to domain's DMARC policy. - gsmtp",
     "authentication"),
    (550, "5.7.27", "The sender's domain example.org has not passed SPF. - gsmtp", "authentication"),
    (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address. "
                    "To protect our users from spam, mail sent from your IP address has been temporarily rate "
                    "limited. - gsmtp", "rate_limit"),
    (550, "5.7.1", "[192.0.2.1] Our system has detected that this message is likely suspicious due to the very "
                   "low reputation of the sending IP address. To best protect our users from spam, the message "
                   "has been blocked. - gsmtp", "policy"),
    (550, "5.7.1", "[192.0.2.1] The IP you're using to send mail is not authorized to send email directly to our "
                   "servers. - gsmtp", "policy"),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount "
                   "of spam sent to Gmail, this message has been blocked. - gsmtp", "content"),
    (421, "4.7.0", "TLS required for RCPT domain, closing connection. - gsmtp", "tls"),
    (530, "5.7.0", "Must issue a STARTTLS command first. - gsmtp", "tls"),
    # Microsoft (Exchange Online NDRs, outlook.com)
    (550, "5.7.515", "Access denied, sending domain example.org doesn't meet the required authentication level.",
     "authentication"),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]. To request removal from this list please "
                     "visit https://sender.office.com/", "policy"),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service "
                   "provider since part of their network is on our block list (S3150).", "policy"),
    (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", "invalid_recipient"),
    (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302)", "invalid_recipient"),
    (451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
     "rate_limit"),
    # Yahoo (senders.yahooinc.com/smtp-error-codes)
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
                   "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "rate_limit"),
    (553, "5.7.2", "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed.",
     "policy"),
    (554, "", "delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0]", "invalid_recipient"),
    # Block lists
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "policy"),
    (554, "", "Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation", "policy"),
    # Wording every MTA uses
    (550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown in local recipient table",
     "invalid_recipient"),
    (550, "", "No such user here", "invalid_recipient"),
    (552, "", "Mailbox full", "mailbox_full"),
    (554, "5.7.1", "Message rejected as spam by Content Filtering", "content"),
    (553, "5.1.8", "<news@example.org>: Sender address rejected: Domain not found", "policy"),
    (450, "4.2.0", "<bob@example.org>: Recipient address rejected: Greylisted, see https://postgrey.example/",
     "other"),
]

STATUS_ONLY = [
    ("5.1.1", "invalid_recipient"), ("5.1.2", "invalid_recipient"), ("5.1.3", "invalid_recipient"),
    ("5.1.6", "invalid_recipient"), ("5.1.10", "invalid_recipient"), ("5.2.2", "mailbox_full"),
    ("4.2.1", "mailbox_full"), ("5.3.4", "too_large"), ("4.4.7", "routing"), ("5.4.4", "routing"),
    ("5.7.1", "policy"), ("5.7.25", "authentication"), ("5.7.23", "authentication"), ("5.7.10", "tls"),
    ("5.7.5", "tls"), ("5.6.0", "content"), ("5.5.2", "other"), ("", "other"),
]


@pytest.mark.parametrize("code, status, text, expected", REPLIES)
def test_provider_replies(code, status, text, expected):
    assert classify_reply(status, text, code) == expected


@pytest.mark.parametrize("code, status, text, expected", REPLIES)
def test_a_returned_dsn_reads_the_same(code, status, text, expected):
    # A DSN's Diagnostic-Code carries the reply whole; its Status field may be missing.
    assert classify_reply(status, f"{code} {status} {text}".replace("  ", " ")) == expected


@pytest.mark.parametrize("status, expected", STATUS_ONLY)
def test_rfc3463_codes_are_the_fallback(status, expected):
    assert classify_reply(status, "") == expected


def test_421_4_7_0_without_words_is_a_rate_limit():
    assert classify_reply("4.7.0", "", 421) == "rate_limit"


def test_a_status_inside_an_ip_address_is_not_a_status():
    assert classify_reply("", "550 host 10.5.1.8 said: go away") == "other"


def test_a_bounce_rule_overrides_the_built_in_ones():
    rules = (BounceRule(re.compile(r"5\.7\.26", re.I), "other"),
             BounceRule(re.compile(r"^550 5\.7\.1 .*mailbox moved", re.I), "invalid_recipient"))
    assert classify_reply("5.7.26", "DMARC", 550, rules) == "other"
    assert classify_reply("5.7.1", "mailbox moved, spam", 550, rules) == "invalid_recipient"
    assert classify_reply("5.1.1", "user unknown", 550, rules) == "invalid_recipient"


@pytest.mark.parametrize("category, permanent, effect", [
    ("invalid_recipient", True, HARD), ("invalid_recipient", False, SOFT), ("mailbox_full", True, SOFT),
    ("mailbox_full", False, SOFT), ("policy", True, None), ("authentication", True, None), ("content", True, None),
    ("rate_limit", False, None), ("too_large", True, None), ("routing", True, None), ("tls", True, None),
    ("other", True, None),
])
def test_only_invalid_recipients_and_full_mailboxes_count_against_the_address(category, permanent, effect):
    assert suppression_effect(category, permanent) == effect


@given(st.text(max_size=300), st.text(max_size=20), st.one_of(st.none(), st.integers(200, 599)))
def test_never_raises_and_always_gives_a_class(text, status, code):
    assert classify_reply(status, text, code) in BOUNCE_CLASSES
