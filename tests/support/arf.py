"""Complaint reports shaped as the feedback loops send them (RFC 5965), for tests."""

from __future__ import annotations

ORIGINAL = (
    "Return-Path: <{return_path}>\n"
    "Received: from mail.example.test (mail.example.test [192.0.2.10])\n\tby mta1.provider.test; Mon, 20 Jul 2026 09:14:02 +0000\n"
    "DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=s1; h=from:to; bh=x; b=y\n"
    "From: Spring News <news@example.test>\n"
    "To: {to}\n"
    "Subject: Spring sale\n"
    "Message-ID: <campaign-1.{tag}@example.test>\n"
    "{extra}"
    "\n"
    "Buy now.\n"
)


def arf_report(*, rcpt_to: str | None = "bob@yahoo.test", return_path: str = "bounces+bob=yahoo.test@example.test",
               to: str = "bob@yahoo.test", user_agent: str = "Yahoo!-Mail-Feedback/2.0", feedback_type: str = "abuse",
               original_extra: str = "", original_type: str = "message/rfc822", tag: str = "1",
               boundary: str = "----=_Part_ARF_1") -> bytes:
    """A Yahoo-CFL-like report (the three parts of RFC 5965 2); rcpt_to None leaves
    Original-Rcpt-To out (Microsoft's JMRP, redacting FBLs)."""
    original = ORIGINAL.format(return_path=return_path, to=to, tag=tag, extra=original_extra)
    if original_type == "text/rfc822-headers":
        original = original.split("\n\n", 1)[0] + "\n"
    fields = (f"Feedback-Type: {feedback_type}\nUser-Agent: {user_agent}\nVersion: 1\n"
              f"Original-Mail-From: <{return_path}>\n"
              + (f"Original-Rcpt-To: <{rcpt_to}>\n" if rcpt_to is not None else "")
              + "Arrival-Date: Mon, 20 Jul 2026 09:14:02 +0000\nSource-IP: 192.0.2.10\nReported-Domain: example.test\n")
    text = (
        "From: Mail AntiSpam Feedback <feedback@fbl.provider.test>\n"
        "To: fbl@example.test\n"
        "Subject: FW: Spring sale\n"
        "Date: Mon, 20 Jul 2026 09:20:00 +0000\n"
        "Message-ID: <report-{tag}@fbl.provider.test>\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=feedback-report;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a multi-part message in MIME format.\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=us-ascii\n\n"
        "This is an email abuse report for an email message received from IP 192.0.2.10.\n\n"
        f"--{boundary}\n"
        "Content-Type: message/feedback-report\n\n"
        f"{fields}\n"
        f"--{boundary}\n"
        f"Content-Type: {original_type}\n"
        "Content-Disposition: inline\n\n"
        f"{original}\n"
        f"--{boundary}--\n"
    )
    return text.replace("{tag}", tag).encode("utf-8")


def jmrp_report(recipient: str = "carol@hotmail.test", return_path: str = "news@example.test") -> bytes:
    """Microsoft's JMRP: no Original-Rcpt-To; the recipient only in the original's
    X-HmXmrOriginalRecipient, its To: masked."""
    return arf_report(rcpt_to=None, return_path=return_path, to="masked@hotmail.test",
                      user_agent="Microsoft Junk Mail Reporting Program",
                      original_extra=f"X-HmXmrOriginalRecipient: <{recipient}>\n")
