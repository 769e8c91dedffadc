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
        raw = json.loads(data)
        for key in _RETIRED_ENVELOPE_KEYS:
            raw.pop(key, None)
        raw["recipients"] = [Recipient(**_without_retired(r)) for r in raw["recipients"]]
        return cls(**raw)


# RFC 3461 fields that envelopes written before they were dropped carry (as null: nothing set
# them); loading ignores them. The DSN extension brings them back as real fields.
_RETIRED_ENVELOPE_KEYS = ("ret", "envid")
_RETIRED_RECIPIENT_KEYS = ("notify", "orcpt")


def _without_retired(recipient: dict[str, Any]) -> dict[str, Any]:
    for key in _RETIRED_RECIPIENT_KEYS:
        recipient.pop(key, None)
    return recipient
