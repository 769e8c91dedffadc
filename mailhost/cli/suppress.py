"""`mailhost suppress ...`: the suppression list, by class and sender domain, and CSV
export/import so that a list can move between tools.

The CSV has a header row; its columns are CSV_COLUMNS (an import needs `address`, the
others may be missing or empty). An import checks every row first and imports nothing
when one is bad: each bad row is reported as FILE:LINE: why.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from typing import IO, Any

from mailhost.config import BOUNCE_CLASSES, Config
from mailhost.feedback.suppression import (CSV_COLUMNS, SuppressionEntry, SuppressionError, entry_problem, scope_key,
                                           suppression_list, write_csv)

# A bounce class, or what a complaint or an unsubscription is filed under.
CLASSES = (*BOUNCE_CLASSES, "complaint", "unsubscribe")
MAX_REPORTED = 20  # bad rows listed before "... and N more"


class SuppressUsageError(Exception):
    """A mistake in the command line or the file; one line (or FILE:LINE lines), exit 1."""


def add_parser(commands: Any, parser_class: type) -> None:
    """`suppress list|add|remove|export|import` under `commands` (main.build_parser)."""
    suppress = commands.add_parser("suppress", help="the suppression list: addresses not to send to").add_subparsers(
        dest="suppress_command", required=True, metavar="list|add|remove|export|import", parser_class=parser_class
    )
    listing = suppress.add_parser("list", help="suppressed addresses, with the class and the reply that caused each")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    add = suppress.add_parser("add", help="stop sending to an address")
    add.add_argument("address")
    add.add_argument("--reason", default="added by the operator")
    remove = suppress.add_parser("remove", help="send to an address again")
    remove.add_argument("address")
    export = suppress.add_parser("export", help="the list as CSV (to FILE, or - / nothing for standard output)")
    export.add_argument("file", nargs="?", default="-")
    imported = suppress.add_parser("import", help="add the entries of a CSV file (- for standard input)")
    imported.add_argument("file")
    for sub in (listing, add, export):
        sub.add_argument("--class", dest="category", metavar="CLASS",
                         help=f"only this class (list, export) or file under it (add): {', '.join(CLASSES)}")
    for sub in (listing, add, remove, export):
        sub.add_argument("--scope", metavar="DOMAIN",
                         help="for mail from this sender domain only (remove: just that entry)")


def run(config: Config, args: argparse.Namespace) -> int:
    category = getattr(args, "category", None)
    if category is not None and category not in CLASSES:
        raise SuppressUsageError(f"--class {category!r}: not a class ({', '.join(CLASSES)})")
    scope = getattr(args, "scope", None)
    if scope is not None:
        scope = scope_key(scope)
    suppressed = suppression_list(config.server.state_dir)
    command = args.suppress_command
    try:
        if command in ("list", "export"):
            entries = [e for e in suppressed.entries()
                       if (category is None or e.category == category) and (scope is None or e.scope == scope)]
            if command == "export":
                _export(entries, args.file)
            elif args.json:
                print(json.dumps({"suppressed": [_json_entry(e) for e in entries]}, ensure_ascii=False))
            else:
                for e in entries:
                    where = f"  (mail from {e.scope})" if e.scope else ""
                    print(f"{e.address}  {e.category or '-'}  {e.status or '-'}  {e.date}  {e.source}: {e.reason}{where}")
                print(f"{len(entries)} suppressed addresses")
        elif command == "add":
            suppressed.add(args.address, "5.0.0", args.reason, category=category or "", scope=scope or "")
            print(f"suppressed {args.address}" + (f" for mail from {scope}" if scope else ""))
        elif command == "remove":
            if not suppressed.remove(args.address, scope):
                raise SuppressUsageError(f"{args.address} is not suppressed" + (f" for mail from {scope}" if scope else ""))
            print(f"{args.address} may be sent to again" + (f" from {scope}" if scope else ""))
        else:
            entries = _read_csv(args.file)
            print(f"imported {suppressed.add_entries(entries)} entries from {_name(args.file)}")
    except (SuppressionError, ValueError) as e:
        raise SuppressUsageError(str(e)) from None
    return 0


def _json_entry(entry: SuppressionEntry) -> dict[str, str]:
    """The stored fields (the keys scripts used before) and INTERFACE.md's: class, since."""
    return {**asdict(entry), "class": entry.category, "since": entry.date}


def _name(path: str) -> str:
    return "standard input" if path == "-" else path


def _export(entries: list[SuppressionEntry], path: str) -> None:
    def write(stream: IO[str]) -> None:
        write_csv(entries, stream)

    if path == "-":
        write(sys.stdout)
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8", newline="") as stream:
        write(stream)


def _read_csv(path: str) -> list[SuppressionEntry]:
    """Every row as an entry, or SuppressUsageError listing each bad row as FILE:LINE: why."""
    name = _name(path)
    try:
        if path == "-":
            return _rows(sys.stdin, name)
        with open(path, encoding="utf-8", newline="") as stream:
            return _rows(stream, name)
    except UnicodeDecodeError:
        raise SuppressUsageError(f"{name}: not UTF-8 text; nothing imported") from None


def _rows(stream: IO[str], name: str) -> list[SuppressionEntry]:
    reader = csv.reader(stream, strict=True)
    problems: list[str] = []
    entries: list[SuppressionEntry] = []
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        unknown = [h for h in header if h not in CSV_COLUMNS]
        if "address" not in header or unknown or len(set(header)) != len(header):
            raise SuppressUsageError(f"{name}:1: the header row must name the columns, among "
                                     f"{','.join(CSV_COLUMNS)} (address required, each once); nothing imported")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(f"{name}:{line}: {len(row)} fields, the header has {len(header)}")
                continue
            fields = dict(zip(header, (cell.strip() for cell in row)))
            problem, entry = _entry(fields)
            if problem:
                problems.append(f"{name}:{line}: {problem}")
            elif entry is not None:
                entries.append(entry)
    except csv.Error as e:
        problems.append(f"{name}:{reader.line_num}: {e}")
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more")
        rows = "1 bad row" if len(problems) == 1 else f"{len(problems)} bad rows"
        raise SuppressUsageError("\n".join(shown) + f"\n{name}: {rows}; nothing imported")
    return entries


def _entry(fields: dict[str, str]) -> tuple[str | None, SuppressionEntry | None]:
    category = fields.get("class", "")
    source = fields.get("source", "") or "manual"
    since = fields.get("since", "")
    scope = fields.get("scope", "")
    problem = entry_problem(fields["address"], fields.get("status", ""), source, scope)
    if problem is None and category and category not in CLASSES:
        problem = f"class {category!r}: not one of {', '.join(CLASSES)}"
    if problem is None and since:
        try:
            when = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            problem = f"since {since!r}: not an ISO 8601 date such as 2026-01-31T12:00:00+00:00"
        else:
            since = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat(
                timespec="seconds")
    if problem is not None:
        return problem, None
    address = fields["address"].strip().strip("<>").strip()
    return None, SuppressionEntry(address, fields.get("status", ""), fields.get("reason", ""), since, source,
                                  category, scope)
