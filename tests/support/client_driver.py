"""Run mailhost's SMTP client once, in its own process (the reactor cannot restart in pytest).

    python -m tests.support.client_driver '<json>'    (or the JSON on stdin, for big messages)

The JSON names the server (host, address, port), helo, tls, trust_root (a CA
PEM path), auth ([user, password]), timeouts, and messages: a list of
{"sender", "recipients", "data" (latin-1 text), "body_8bit", "smtputf8",
"reset_first" (RSET before this one)}.
Prints one JSON object: {"open": {...}, "sends": [...], "usable": [...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.task import react

from mailhost.smtp.client import SessionError, open_session
from mailhost.smtp.wire import Reply


def reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "text": reply.text, "status": reply.effective_status, "str": str(reply),
            "permanent": reply.permanent, "transient": reply.transient}


def error_json(error: SessionError) -> dict[str, Any]:
    return {"reason": error.reason, "permanent": error.permanent, "reply": reply_json(error.reply)}


async def run(reactor: Any, spec: dict[str, Any]) -> dict[str, Any]:
    trust_root = None
    if spec.get("trust_root"):
        trust_root = ssl.Certificate.loadPEM(Path(spec["trust_root"]).read_bytes())
    auth = tuple(spec["auth"]) if spec.get("auth") else None
    timeouts = {key: spec[key] for key in ("connect_timeout", "command_timeout", "data_timeout") if key in spec}
    result: dict[str, Any] = {"sends": [], "usable": []}
    try:
        session = await open_session(
            reactor, host=spec["host"], address=spec["address"], port=spec["port"], helo=spec.get("helo", "client.test"),
            tls=spec.get("tls", "none"), trust_root=trust_root, auth=auth, **timeouts,
        )
    except SessionError as e:
        result["open"] = {"ok": False, "error": error_json(e)}
        return result
    result["open"] = {"ok": True, "peer": session.peer, "tls_version": session.tls_version, "extensions": session.extensions}
    if spec.get("chain"):
        await _chained(session, spec["messages"], result)
        await session.quit()
        return result
    for message in spec.get("messages", []):
        try:
            if message.get("reset_first"):
                await session.reset()
            sent = await session.send(
                message["sender"], message["recipients"], message["data"].encode("latin-1"),
                body_8bit=message.get("body_8bit", False), smtputf8=message.get("smtputf8", False),
            )
            result["sends"].append({"replies": {rcpt: reply_json(reply) for rcpt, reply in sent.replies.items()}})
        except SessionError as e:
            result["sends"].append({"error": error_json(e)})
        result["usable"].append(session.usable)
    if spec.get("quit", True):
        await session.quit()
    return result


async def _chained(session: Any, messages: list[dict], result: dict[str, Any]) -> None:
    """As the Deliverer does with a deep queue: each message is started from the previous
    one's body_written hand-over, before that one's final reply."""
    from twisted.internet.defer import gatherResults

    sends: list = []
    replies: dict[int, Any] = {}

    def start(index: int) -> None:
        message = messages[index]
        following = (lambda: start(index + 1)) if index + 1 < len(messages) else None
        sent = session.send(message["sender"], message["recipients"], message["data"].encode("latin-1"),
                            body_written=following)
        sends.append(sent.addCallback(lambda reply, index=index: replies.__setitem__(index, reply)))

    start(0)
    while len(sends) < len(messages):
        started = len(sends)
        await sends[-1]
        if len(sends) == started:  # no hand-over (no PIPELINING): start the next one now
            result["unchained"] = True
            start(started)
    await gatherResults(sends)
    for sent in (replies[index] for index in range(len(messages))):
        result["sends"].append({"replies": {rcpt: reply_json(reply) for rcpt, reply in sent.replies.items()}})
    result["usable"].append(session.usable)


def main(reactor: Any, argument: str) -> Any:
    from twisted.internet.defer import Deferred

    async def go() -> None:
        result = await run(reactor, json.loads(argument))
        print(json.dumps(result), flush=True)

    return Deferred.fromCoroutine(go())


if __name__ == "__main__":
    react(main, [sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()])
