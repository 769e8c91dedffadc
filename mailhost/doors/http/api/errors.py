"""Every API error is one JSON body with a stable code (clients branch on `code`, people read
`message`, and `field` names the request field at fault, when one is):

    {"error": {"code": "missing_field", "message": "...", "field": "to"}}
"""

from __future__ import annotations

import json


class ApiError(Exception):
    """An answer other than success: the HTTP status and the error body's fields."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    error: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return json.dumps({"error": error}, ensure_ascii=False).encode("utf-8")


def bad_field(field: str, message: str, code: str = "invalid_field") -> ApiError:
    """400 naming `field` (as the request spells it: "to[2]", "attachments[0].content")."""
    return ApiError(400, code, message, field)


def missing(field: str, what: str) -> ApiError:
    return ApiError(400, "missing_field", f"{field} is required: {what}", field)
