"""`mailhost apikey add|list|del`: the keys of the HTTP API (mailhost.doors.http.api.keys)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mailhost.config import Config
from mailhost.doors.http.api.keys import DEFAULT_RATE, SCOPES, ApiKeyError, api_keys, parse_scopes, parse_sender


def add_parser(commands: Any, parser_class: type) -> None:
    """`apikey add|list|del` under `commands` (main.build_parser)."""
    apikey = commands.add_parser("apikey", help="keys of the HTTP API (/api/v1)").add_subparsers(
        dest="apikey_command", required=True, metavar="add|list|del", parser_class=parser_class)
    add = apikey.add_parser("add", help="make a key and print it (once: only its hash is kept)")
    add.add_argument("name")
    add.add_argument("--scope", action="append", metavar="|".join(SCOPES),
                     help="send: POST messages; read: read messages, queue, suppressions, events; admin: all, and "
                          "change suppressions (repeat for several; default send)")
    add.add_argument("--sender", action="append", default=[], metavar="ADDRESS|@DOMAIN",
                     help="an address or @domain the key may send as (repeat for several; none: it may not send)")
    add.add_argument("--rate", type=float, default=DEFAULT_RATE, metavar="PER_SECOND",
                     help="requests per second (bursts of 5 seconds' worth); default %(default)g")
    listing = apikey.add_parser("list", help="the keys: name, scopes, senders, rate (never the key)")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    apikey.add_parser("del", help="remove a key; it is refused from the next request on").add_argument("name")


def run(config: Config, args: argparse.Namespace) -> int:
    """ApiKeyError for a user mistake (main prints it as one line)."""
    keys = api_keys(config.server.state_dir)
    command = args.apikey_command
    if command == "add":
        scopes = parse_scopes(args.scope)
        senders = tuple(dict.fromkeys(parse_sender(s) for s in args.sender))
        key = keys.add(args.name, scopes, senders, args.rate)
        print(key)
        sys.stdout.flush()
        if not senders and ("send" in scopes or "admin" in scopes):
            sys.stderr.write(f"mailhost: note: key {args.name} has no --sender, so it may not send mail\n")
    elif command == "del":
        keys.delete(args.name)
        print(f"deleted key {args.name}")
    else:
        entries = keys.keys()
        if args.json:
            print(json.dumps({"keys": [{"name": k.name, "scopes": list(k.scopes), "senders": list(k.senders),
                                        "rate": k.rate, "created": k.created} for k in entries]}))
        else:
            for k in entries:
                print(f"{k.name}  {','.join(k.scopes)}  senders={','.join(k.senders) or '-'}  rate={k.rate:g}/s  "
                      f"created {k.created}")
            print(f"{len(entries)} keys")
    return 0


__all__ = ["ApiKeyError", "add_parser", "run"]
