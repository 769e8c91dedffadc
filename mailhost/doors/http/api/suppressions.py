"""/api/v1/suppressions: the suppression list (mailhost.feedback.suppression), as `mailhost
suppress` shows and changes it. GET lists (read scope); POST adds and DELETE
/suppressions/{address} removes (admin scope). Blocking: each runs on a disk thread."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from mailhost.config import BOUNCE_CLASSES
from mailhost.doors.http.api.errors import ApiError, bad_field, missing
from mailhost.doors.http.api.events import int_param, text_param
from mailhost.feedback.suppression import SuppressionEntry, SuppressionList, address_key, scope_key

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CLASSES = (*BOUNCE_CLASSES, "complaint", "unsubscribe")


def entry_json(entry: SuppressionEntry) -> dict[str, str]:
    """As `mailhost suppress list --json` gives it: the stored fields, and class and since."""
    return {**asdict(entry), "class": entry.category, "since": entry.date}


def list_query(args: dict[bytes, list[bytes]]) -> dict[str, Any]:
    category = text_param(args, "class", 40)
    if category is not None and category not in CLASSES:
        raise bad_field("class", f"class is one of {', '.join(CLASSES)}")
    address = text_param(args, "address")
    scope = text_param(args, "scope", 255)
    return {"address": address_key(address) if address else None, "category": category,
            "scope": scope_key(scope) if scope else None, "limit": int_param(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            "offset": int_param(args, "offset", 0, 0, 10**9)}


def list_entries(suppression: SuppressionList, address: str | None, category: str | None, scope: str | None,
                 limit: int, offset: int) -> dict[str, Any]:
    entries = [e for e in suppression.entries() if (address is None or e.address == address)
               and (category is None or e.category == category) and (scope is None or e.scope == scope)]
    return {"suppressions": [entry_json(e) for e in entries[offset:offset + limit]], "total": len(entries)}


def add_entry(suppression: SuppressionList, data: Any, key_name: str) -> dict[str, Any]:
    """POST {"address", "reason"?, "class"?, "scope"?}: the entry as stored."""
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    for name in data:
        if name not in ("address", "reason", "class", "scope"):
            raise bad_field(str(name)[:60], f"unknown field {str(name)[:60]!r} (known: address, reason, class, scope)",
                            "unknown_field")
    address = data.get("address")
    if address is None:
        raise missing("address", "the address not to send to")
    fields = {name: data.get(name, default) for name, default in
              (("address", ""), ("reason", f"added with API key {key_name}"), ("class", ""), ("scope", ""))}
    for name, value in fields.items():
        if not isinstance(value, str) or len(value) > 500:
            raise bad_field(name, f"{name} must be a string of at most 500 characters")
    if fields["class"] and fields["class"] not in CLASSES:
        raise bad_field("class", f"class is one of {', '.join(CLASSES)}")
    try:
        suppression.add(fields["address"], "5.0.0", fields["reason"], category=fields["class"], scope=fields["scope"])
    except ValueError as error:
        raise bad_field("scope" if "domain" in str(error) else "address", str(error)) from None
    key, scope = address_key(fields["address"].strip().strip("<>")), scope_key(fields["scope"]) if fields["scope"] else ""
    entry = next(e for e in suppression.entries() if e.address == key and e.scope == scope)
    return {"suppression": entry_json(entry)}


def remove_entry(suppression: SuppressionList, address: str, scope: str | None) -> dict[str, Any]:
    """DELETE: the address's entry for every sender and its scoped ones, or with `scope`
    ("" for the unscoped one) only that one; 404 when there was none."""
    if not suppression.remove(address, scope):
        where = f" for mail from {scope}" if scope else ""
        raise ApiError(404, "not_found", f"{address[:320]} is not suppressed{where}")
    return {"removed": address_key(address), "scope": scope}
