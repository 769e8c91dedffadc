"""Who a message is from, as the door it came in by saw it.

A door (the SMTP server, pickup for `mailhost sendmail`, our own DSNs, the
HTTP API) only speaks its protocol and fills in an Origin; the intake
decides from it what happens to the message (cleanup.Intake.receive).
"""

from __future__ import annotations

from dataclasses import dataclass

SMTP = "smtp"
SENDMAIL = "sendmail"
DSN = "dsn"  # bounces and delay warnings this host writes itself
HTTP = "http"  # POST /api/v1/messages with an API key (mailhost.doors.http.api)


@dataclass(frozen=True)
class Origin:
    door: str  # SMTP | SENDMAIL | DSN | HTTP
    role: str = ""  # the SMTP listener's role: mx | submission | submissions
    client_ip: str = ""
    helo: str = ""
    user: str | None = None  # the authenticated address (AUTH, an API key's owner)
    relay_network: bool = False  # the client is in relay.networks
    esmtp: bool = False  # EHLO, not HELO (the Received: "with" word)
    tls: str | None = None  # "TLSv1.3 with cipher ...", None without TLS
    submitter: str = ""  # `mailhost sendmail`: "userid 1000 (alice@host)"; the API: "api key NAME"
    # The API key's allowed senders (addresses, "@domain"): the envelope sender and every
    # originator field must be one of them. None: not an API key (ownership by `user`, if any).
    may_send_as: tuple[str, ...] | None = None

    @property
    def from_outside(self) -> bool:
        """Mail from the internet: anonymous SMTP from outside relay.networks. It gets
        inbound authentication, and none of the fix-ups or the signature our own mail gets."""
        return self.door == SMTP and self.user is None and not self.relay_network

    @property
    def own_client(self) -> bool:
        """One of our own senders (a user, a relay-network host, a local program, the API):
        its mail gets Message-ID:/Date: when missing, and its recipients are checked
        against the suppression list."""
        return not self.from_outside and self.door != DSN

    @property
    def client(self) -> str:
        """Who handed it over, for the envelope, logs and DSNs."""
        if self.door == SMTP:
            return f"{self.helo} ([{self.client_ip}])"
        return self.submitter or self.door
