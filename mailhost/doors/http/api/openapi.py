"""GET /api/v1/openapi.json: the API described in OpenAPI 3.0, written by hand next to the
code it describes (tests/doors/test_http_api.py checks every route here is served and
every served route is here)."""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    texts = {400: "bad JSON, a bad or missing field (`field` names it)", 401: "no key, or an unknown one",
             403: "the key lacks the scope, or may not send as that sender", 404: "not found",
             413: "the body or the message is too large", 415: "wrong Content-Type",
             422: "refused: no recipient could be accepted", 429: "over the key's rate (see Retry-After)",
             503: "try again later"}
    return {str(code): _json(_ref("Error"), texts[code]) for code in codes}


_ADDRESSES = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
              "description": "one address (\"Name <addr>\" or \"addr\") or a list of them"}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}


def openapi_document(message_size: int) -> dict[str, Any]:
    """The document; `message_size` is limits.message_size (the largest message POST takes)."""
    recipient = {"type": "object", "properties": {
        "address": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "deferred", "delivered", "failed"]},
        "attempts": {"type": "integer"}, "last_reply": {"type": "string"},
        "status": {"type": "string", "description": "enhanced status code of the last result, e.g. 4.2.2"},
        "class": {"type": "string", "description": "bounce class of a failure or deferral (empty when delivered)"},
        "remote_mta": {"type": "string"}}}
    queued = {"type": "object", "properties": {
        "id": {"type": "string"}, "sender": {"type": "string"}, "arrival": {"type": "string", "format": "date-time"},
        "next_attempt": {"type": "string", "format": "date-time"}, "held": {"type": "boolean"},
        "client": {"type": "string"}, "recipients": {"type": "array", "items": _ref("Recipient")}}}
    suppression = {"type": "object", "properties": {
        name: {"type": "string"} for name in ("address", "status", "reason", "date", "since", "source", "class",
                                              "scope", "category")}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "mailhost HTTP API", "version": "1",
                 "description": "Send mail and see what happened to it. Keys: `mailhost apikey add NAME --scope "
                                "send|read|admin --sender ADDRESS|@DOMAIN`; send them as `Authorization: Bearer KEY`."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "description": "stable: unauthorized, invalid_key, "
                                 "insufficient_scope, sender_not_allowed, not_found, method_not_allowed, too_large, "
                                 "unsupported_media_type, bad_json, missing_field, invalid_field, unknown_field, "
                                 "too_many_recipients, bad_message, mail_loop, recipients_refused, refused, "
                                 "rate_limited, try_later, unavailable, internal_error"},
                        "message": {"type": "string"},
                        "field": {"type": "string", "description": "the request field at fault, e.g. to[1]"}}}}},
                "Recipient": recipient,
                "QueuedMessage": queued,
                "Suppression": suppression,
                "NewMessage": {"type": "object", "required": ["from"], "properties": {
                    "from": {"type": "string", "description": "one of the key's senders"},
                    "to": _ADDRESSES, "cc": _ADDRESSES, "bcc": _ADDRESSES,
                    "subject": {"type": "string"}, "text": {"type": "string"}, "html": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "more header fields (not From, To, Cc, Bcc, Subject, MIME fields, "
                                               "Received, DKIM-Signature ...)"},
                    "attachments": {"type": "array", "items": {"type": "object", "required": ["content"], "properties": {
                        "filename": {"type": "string"}, "content_type": {"type": "string"},
                        "content": {"type": "string", "format": "byte", "description": "base64"}}}}},
                    "description": "at least one recipient (to, cc or bcc) and text or html"},
            },
        },
        "paths": {
            "/openapi.json": {"get": {"summary": "this document", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3"}}}},
            "/messages": {"post": {
                "summary": "send a message (scope send)",
                "description": f"202 once the message is stored durably. At most {message_size} bytes "
                               "(limits.message_size). A raw message takes its envelope from the query's from and "
                               "to (repeatable), else from its From:, To:, Cc:, Bcc: (Bcc: is removed).",
                "parameters": [{"name": "from", "in": "query", "schema": {"type": "string"}},
                               {"name": "to", "in": "query", "schema": {"type": "array", "items": {"type": "string"}},
                                "style": "form", "explode": True}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("NewMessage")},
                    "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"202": _json({"type": "object", "properties": {
                    "id": {"type": "string", "description": "the queue id"},
                    "queued": {"type": "integer"}, "local": {"type": "integer"},
                    "refused": {"type": "array", "items": {"type": "object", "properties": {
                        "recipient": {"type": "string"}, "reply": {"type": "string"}}}}}}, "accepted"),
                    **_errors(400, 401, 403, 413, 415, 422, 429, 503)}}},
            "/messages/{id}": {"get": {
                "summary": "a message's recipients and events (scope read)",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json({"allOf": [_ref("QueuedMessage"), {"type": "object", "properties": {
                    "queued": {"type": "boolean"}, "events": {"type": "array", "items": {"type": "object"}}}}]},
                    "the message, from the queue while it is there, else from the event log"),
                    **_errors(401, 403, 404, 429)}}},
            "/queue": {"get": {
                "summary": "queued messages, oldest first (scope read)",
                "parameters": [{"name": "state", "in": "query",
                                "schema": {"type": "string", "enum": ["pending", "deferred", "held"]}},
                               {"name": "sender", "in": "query", "schema": {"type": "string"}},
                               {"name": "domain", "in": "query", "schema": {"type": "string"},
                                "description": "a recipient's domain"}, _LIMIT],
                "responses": {"200": _json({"type": "object", "properties": {
                    "messages": {"type": "array", "items": _ref("QueuedMessage")}, "total": {"type": "integer"},
                    "truncated": {"type": "boolean"}}}, "the queue"), **_errors(400, 401, 403, 429)}}},
            "/suppressions": {
                "get": {"summary": "the suppression list (scope read)",
                        "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}}
                                       for n in ("address", "class", "scope")]
                        + [_LIMIT, {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
                        "responses": {"200": _json({"type": "object", "properties": {
                            "suppressions": {"type": "array", "items": _ref("Suppression")},
                            "total": {"type": "integer"}}}, "entries"), **_errors(400, 401, 403, 429)}},
                "post": {"summary": "suppress an address (scope admin)",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["address"], "properties": {
                                 n: {"type": "string"} for n in ("address", "reason", "class", "scope")}}}}},
                         "responses": {"201": _json({"type": "object", "properties": {
                             "suppression": _ref("Suppression")}}, "added"), **_errors(400, 401, 403, 415, 429)}}},
            "/suppressions/{address}": {"delete": {
                "summary": "send to an address again (scope admin)",
                "parameters": [{"name": "address", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "scope", "in": "query", "schema": {"type": "string"},
                                "description": "only the entry for this sender domain (empty: the unscoped one)"}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "removed": {"type": "string"}, "scope": {"type": "string", "nullable": True}}}, "removed"),
                    **_errors(401, 403, 404, 429)}}},
            "/events": {"get": {
                "summary": "delivery events, oldest first: what the webhooks carry (scope read)",
                "parameters": [{"name": "since", "in": "query", "schema": {"type": "string"},
                                "description": "the `next` of the previous answer"}, _LIMIT],
                "responses": {"200": _json({"type": "object", "properties": {
                    "events": {"type": "array", "items": {"type": "object"}}, "next": {"type": "string"}}}, "events"),
                    **_errors(400, 401, 403, 429)}}},
        },
    }
