"""The envelope of a queued message: who sent it, each recipient's own state,
and what DSNs need. Stored as JSON next to the message (no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

PENDING = "pending"  # not tried yet
DEFERRED = "deferred"  # tried, failed temporarily, will be retried
DELIVERED = "delivered"
FAILED = "failed"  # permanently; goes into the bounce
FINAL_STATES = (DELIVERED, FAILED)


@dataclass
class Recipient:
    address: str  # as the client gave it in RCPT (source route dropped)
    state: str = PENDING
    attempts: int = 0
    last_reply: str = ""  # e.g. "451 4.7.1 try later" or "connect to x[1.2.3.4]:25: refused"
    status: str = ""  # enhanced status of the last result, e.g. "4.4.1"
    remote_mta: str = ""  # host name of the last server that answered
    bounced: bool = False  # a failure DSN already told the sender about it
    # RFC 3461: the client's NOTIFY (None: not given, which means FAILURE and DELAY here, as
    # in Postfix) and ORCPT ("addr-type;address", decoded), for our DSNs and the next hop.
    notify: list[str] | None = None
    orcpt: str | None = None

    def wants(self, event: str) -> bool:
        """Whether a DSN for `event` ("SUCCESS", "FAILURE", "DELAY") is asked for (RFC 3461 4.1)."""
        if self.notify is None:
            return event != "SUCCESS"
        return event in self.notify

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class Envelope:
    id: str
    sender: str  # "" is the null sender <>
    recipients: list[Recipient]
    arrival: float  # epoch seconds
    next_attempt: float
    client: str = ""  # who handed it to us, for logs and DSNs: "helo ([ip])"
    body_8bit: bool = False
    smtputf8: bool = False
    delay_warned: bool = False
    held: bool = False
    ret: str | None = None  # RFC 3461 RET: "FULL", "HDRS" or None (not given)
    envid: str | None = None  # RFC 3461 ENVID, decoded
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return all(r.is_final for r in self.recipients)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.is_final]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        # Envelopes written before the DSN fields carry them as null or not at all: both load.
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**_notify_as_list(r)) for r in raw["recipients"]]
        return cls(**raw)


def _notify_as_list(recipient: dict[str, Any]) -> dict[str, Any]:
    """NOTIFY as the list this version writes; a file may hold it as RFC 3461 writes it ("SUCCESS,DELAY")."""
    notify = recipient.get("notify")
    if isinstance(notify, str):
        recipient["notify"] = [word.strip().upper() for word in notify.split(",") if word.strip()]
    return recipient
