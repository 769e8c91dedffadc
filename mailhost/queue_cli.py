"""`mailhost queue ...`: reading the spool directly, steering through the daemon when it runs."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from mailhost.config import Config
from mailhost.control import DaemonNotRunning, current_pace, send_queue_command
from mailhost.spool import Spool


def run_queue_command(config: Config, args: argparse.Namespace) -> int:
    spool = Spool(config.server.state_dir / "spool")
    command = args.queue_command
    if command == "list":
        return queue_list(spool, args.json, config.server.state_dir)
    if command == "show":
        return queue_show(spool, args.id)
    queue_id = getattr(args, "id", None)
    if queue_id is not None:
        spool.load(queue_id)  # a clear "no such message" before anything else
    try:
        count = send_queue_command(config.server.state_dir, command, queue_id)
        print(_done(command, queue_id, count, "by the running daemon"))
    except DaemonNotRunning:
        count = _offline(spool, command, queue_id)
        print(_done(command, queue_id, count, "in the spool (the daemon is not running)"))
    return 0


def _done(command: str, queue_id: str | None, count: int, where: str) -> str:
    past = {"flush": "flushed", "delete": "deleted", "hold": "held", "release": "released"}[command]
    what = queue_id if queue_id else f"{count} messages"
    return f"{what}: {past} {where}"


def _offline(spool: Spool, command: str, queue_id: str | None) -> int:
    """The same steering with no daemon: edit the envelopes on disk."""
    if command == "delete":
        assert queue_id is not None
        spool.remove(queue_id)
        return 1
    envelopes = [spool.load(queue_id)] if queue_id else list(spool.envelopes())
    for envelope in envelopes:
        if command == "flush":
            envelope.next_attempt = time.time()
        else:
            envelope.held = command == "hold"
        spool.update(envelope)
    return len(envelopes)


def _summary(envelope: dict) -> dict:
    """One message for the listing, from its envelope's JSON (see envelope.Envelope)."""
    return {
        "id": envelope["id"],
        "sender": envelope["sender"],
        "arrival": _iso(envelope["arrival"]),
        "next_attempt": _iso(envelope["next_attempt"]),
        "held": envelope.get("held", False),
        "recipients": [
            {key: r.get(key, "") for key in ("address", "state", "attempts", "last_reply", "status")}
            for r in envelope["recipients"]
        ],
    }


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def queue_list(spool: Spool, as_json: bool, state_dir: Path) -> int:
    # Raw JSON dicts, not Envelope objects: `queue list` of 100,000 messages stays quick.
    messages = [_summary(e) for e in sorted(spool.raw_envelopes(), key=lambda e: e["arrival"])]
    try:
        paces = current_pace(state_dir)
    except DaemonNotRunning:
        paces = {}
    if as_json:
        print(json.dumps({"messages": messages, "pace": paces}, ensure_ascii=False))
        return 0
    lines = [f"pace {group}: {values['rate']:.0f}/min (at most {values['max_rate']:.0f}/min, "
             f"{values['connections']:.0f} connections)" for group, values in paces.items()]
    for message in messages:
        held = " HELD" if message["held"] else ""
        lines.append(f"{message['id']}  {message['arrival']}  <{message['sender']}>{held}  next {message['next_attempt']}")
        for r in message["recipients"]:
            reply = f"  ({r['last_reply']})" if r["last_reply"] else ""
            lines.append(f"    {r['state']:9} {r['attempts']} attempts  <{r['address']}>{reply}")
    lines.append(f"{len(messages)} messages in the queue")
    print("\n".join(lines))
    return 0


def queue_show(spool: Spool, queue_id: str) -> int:
    envelope = spool.load(queue_id)
    print(json.dumps(asdict(envelope), indent=2, ensure_ascii=False))
    message = spool.read_message(queue_id)
    end = message.find(b"\n\n")
    print()
    print(message[: end if end >= 0 else len(message)].decode("utf-8", "replace"))
    return 0
