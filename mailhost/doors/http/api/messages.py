"""POST /api/v1/messages: a message from a campaign tool or web app into the one intake path.

The body is JSON (`application/json`, built by compose.compose) or a whole message
(`message/rfc822`, compose.raw_message). The door only says who it is from (an Origin: the
HTTP door, the key's name and its allowed senders); the intake applies the fix-ups, sender
ownership, suppression, unsubscribe headers and DKIM, and answers only once the message is
durable: so 202 promises what a 250 after DATA does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailhost.doors.http.api.compose import Composed, compose, raw_message
from mailhost.doors.http.api.errors import ApiError
from mailhost.doors.http.api.keys import ApiKey
from mailhost.intake.cleanup import Incoming, Intake, Refused
from mailhost.intake.origin import HTTP, Origin
from mailhost.smtp.wire import Reply

log = Logger(namespace="mailhost.http")

JSON_TYPES = ("application/json",)
RAW_TYPES = ("message/rfc822",)


@dataclass(frozen=True)
class Submission:
    """A POST body already parsed: what is handed to the intake."""

    composed: Composed
    origin: Origin


def media_type(header: bytes | None) -> str:
    """The media type of a Content-Type value, lower case, without parameters."""
    return (header or b"").split(b";", 1)[0].strip().lower().decode("ascii", "replace")


def parse_submission(key: ApiKey, content_type: bytes | None, body: bytes, args: dict[bytes, list[bytes]],
                     client_ip: str, max_recipients: int, max_size: int) -> Submission:
    """The request as a message and its origin; ApiError naming what is wrong."""
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, "bad_json", f"the body is not JSON: {error}"[:300]) from None
        composed = compose(data, max_recipients)
    elif kind in RAW_TYPES:
        sender = _query_text(args, "from")
        recipients = [_decode(v, "to") for v in args.get(b"to", [])]
        composed = raw_message(body, sender, recipients, max_recipients)
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send application/json or message/rfc822 (a whole RFC 5322 message)")
    if len(composed.message) > max_size:
        raise ApiError(413, "too_large", f"the message is {len(composed.message)} bytes; at most {max_size} "
                                         "(limits.message_size)", "message")
    if not key.senders:
        raise ApiError(403, "sender_not_allowed", f"API key {key.name} has no allowed senders "
                                                  "(`mailhost apikey add --sender`)", "from")
    origin = Origin(HTTP, client_ip=client_ip, submitter=f"api key {key.name}", may_send_as=key.senders)
    return Submission(composed, origin)


def _decode(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_field", f"{name} must be UTF-8", name) from None


def _query_text(args: dict[bytes, list[bytes]], name: str) -> str | None:
    values = args.get(name.encode("ascii"))
    return _decode(values[-1], name) if values else None


async def submit(intake: Intake, submission: Submission) -> dict[str, Any]:
    """Hand the message to the intake; the 202 body once it is durable."""
    composed = submission.composed
    incoming = Incoming(composed.sender, composed.recipients, composed.message,
                        body_8bit=not composed.message.isascii(),
                        smtputf8=not all(a.isascii() for a in [composed.sender, *composed.recipients]))
    try:
        receipt = await intake.receive(incoming, submission.origin)
    except Refused as refused:
        raise _refusal(refused.reply) from None
    refused = [{"recipient": address, "reply": f"{reply.code} {reply.status} {reply.text}"}
               for address, reply in receipt.refused]
    if not receipt.local and not receipt.queued:
        error = ApiError(422, "recipients_refused", "no recipient was accepted: "
                         + "; ".join(r["reply"] for r in refused)[:500], "to")
        raise error
    log.info("{id}: accepted from=<{sender}> to={rcpts} size={size} via=api key={key}", id=receipt.queue_id,
             sender=composed.sender, rcpts=",".join(f"<{r}>" for r in composed.recipients
                                                    if r not in {a for a, _ in receipt.refused}),
             size=len(composed.message), key=submission.origin.submitter[len("api key "):])
    return {"id": receipt.queue_id, "queued": receipt.queued, "local": receipt.local, "refused": refused}


def _refusal(reply: Reply) -> ApiError:
    """The intake's SMTP refusal of the whole message as an HTTP answer."""
    text = f"{reply.code} {reply.status} {reply.text}"
    if reply.code == 553:
        return ApiError(403, "sender_not_allowed", text, "from")
    if reply.status == "5.6.0":
        return ApiError(400, "bad_message", text, "headers")
    if reply.status == "5.4.6":
        return ApiError(400, "mail_loop", text, "headers")
    if reply.code >= 500:
        return ApiError(422, "refused", text)
    return ApiError(503, "try_later", text, headers=((b"Retry-After", b"60"),))
