"""What a failure says about the recipient's address: one classifier for the reports
that come back by mail (DSNs) and for the replies our own deliveries get.

A permanent failure (5.x.x) says the address is bad: suppress it at once. A
temporary one (4.x.x, a delayed report, no readable status) counts towards
[bounces] soft_limit. Some failures say nothing about the address at all and never
suppress it: a refusal for policy, reputation or authentication (x.7.x, RFC 3463
3.8: the address is fine, the sender is not), a message too large for the
recipient's system (x.3.4) and a content problem (x.6.x).
"""

from __future__ import annotations

HARD = "hard"
SOFT = "soft"


def _says_nothing_about_the_address(status: str) -> bool:
    parts = status.split(".")
    if len(parts) != 3:
        return False
    subject = parts[1]
    return subject in ("6", "7") or parts[1:] == ["3", "4"]


def suppression_effect(status: str, action: str = "failed") -> str | None:
    """HARD, SOFT, or None when this failure must not suppress the recipient."""
    if status and _says_nothing_about_the_address(status):
        return None
    if action == "failed" and status.startswith("5."):
        return HARD
    return SOFT
