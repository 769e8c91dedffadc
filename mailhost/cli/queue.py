"""`mailhost queue ...`: reading the spool directly, steering through the daemon when it runs."""

from __future__ import annotations

import argparse
import gc
import json
import marshal
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path

from mailhost.config import Config
from mailhost.doors.control import DaemonNotRunning, current_pace, send_queue_command
from mailhost.ops.ownership import owner_of
from mailhost.queue.spool import Spool, SpoolError, envelope_file_problem, is_queue_id

_enc = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) puts a str as


def checked_queue_id(text: str) -> str:
    """`text` as a queue id (ids may be typed in lower case); SpoolError for anything else, so
    that an id never names a path outside the spool (`../x`) or one the system refuses."""
    queue_id = text.upper()
    if not is_queue_id(queue_id):
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        raise SpoolError(f"{shown} is not a queue id (16 letters and digits, as `mailhost queue list` shows them)")
    return queue_id


@dataclass(frozen=True)
class Limits:
    """When the scheduler gives up on a message (queue.lifetime, queue.marketing_lifetime for
    mail from [unsubscribe] senders, queue.max_attempts), for the listing to show."""

    lifetime: float = 5 * 86400.0
    marketing_lifetime: float = 86400.0
    max_attempts: int = 0  # 0: no limit
    is_marketing: Callable[[str], bool] = lambda sender: False

    @classmethod
    def of(cls, config: Config) -> Limits:
        queue = config.queue
        return cls(queue.lifetime, queue.marketing_lifetime, queue.max_attempts, config.unsubscribe.is_marketing)

    def expires(self, sender: str, arrival: float) -> float:
        marketing = bool(sender) and self.is_marketing(sender)
        return arrival + (self.marketing_lifetime if marketing else self.lifetime)


_limits = Limits()  # set by queue_list before any listing (forked children inherit it)


def run_queue_command(config: Config, args: argparse.Namespace) -> int:
    spool = Spool(config.server.state_dir / "spool", owner_of(config.server.state_dir))
    command = args.queue_command
    if command == "list":
        return queue_list(spool, args.json, config.server.state_dir, limits=Limits.of(config))
    queue_id = getattr(args, "id", None)
    if queue_id is not None:
        queue_id = checked_queue_id(queue_id)
    if command == "show":
        assert queue_id is not None
        return queue_show(spool, queue_id)
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
        "expires": _iso(_limits.expires(envelope["sender"], envelope["arrival"])),
        "max_attempts": _limits.max_attempts,
        "recipients": [
            {key: r.get(key, "") for key in ("address", "state", "attempts", "last_reply", "status")}
            for r in envelope["recipients"]
        ],
    }


_days: dict[int, str] = {}
_seconds: dict[int, str] = {}


def _iso(epoch: float) -> str:
    """time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)), without a strftime per call:
    remembered per second (a big queue has many messages from the same second), the date per day."""
    second = math.floor(epoch)  # as gmtime rounds
    text = _seconds.get(second)
    if text is None:
        day, rest = divmod(second, 86400)
        date = _days.get(day)
        if date is None:
            date = _days[day] = time.strftime("%Y-%m-%dT", time.gmtime(day * 86400))
        hour, rest = divmod(rest, 3600)
        minute, rest = divmod(rest, 60)
        text = f"{date}{hour:02d}:{minute:02d}:{rest:02d}Z"
        if len(_seconds) < 1_000_000:
            _seconds[second] = text
    return text


def _json_text(envelope: dict) -> str:
    """json.dumps(_summary(envelope), ensure_ascii=False), written out directly for the usual
    types (what Envelope.to_json writes); anything else goes through _summary and json.dumps."""
    held = envelope.get("held", False)
    recipients = envelope["recipients"]
    queue_id, sender = envelope["id"], envelope["sender"]
    if type(held) is bool and type(recipients) is list and type(queue_id) is str and type(sender) is str:
        parts = []
        for r in recipients:
            try:
                address, state, attempts, last_reply, status = (
                    r["address"], r["state"], r["attempts"], r["last_reply"], r["status"])
            except (KeyError, TypeError):
                break
            if not (type(address) is str and type(state) is str and type(attempts) is int
                    and type(last_reply) is str and type(status) is str):
                break
            parts.append(f'{{"address": {_enc(address)}, "state": {_enc(state)}, "attempts": {attempts}, '
                         f'"last_reply": {_enc(last_reply)}, "status": {_enc(status)}}}')
        else:
            return (f'{{"id": {_enc(queue_id)}, "sender": {_enc(sender)}, "arrival": "{_iso(envelope["arrival"])}", '
                    f'"next_attempt": "{_iso(envelope["next_attempt"])}", "held": {"true" if held else "false"}, '
                    f'"expires": "{_iso(_limits.expires(sender, envelope["arrival"]))}", '
                    f'"max_attempts": {_limits.max_attempts}, "recipients": [{", ".join(parts)}]}}')
    return json.dumps(_summary(envelope), ensure_ascii=False)


def _text_lines(envelope: dict) -> str:
    """The lines of one message in the plain listing (from the envelope, as _summary reads it)."""
    held = " HELD" if envelope.get("held", False) else ""
    expires = _iso(_limits.expires(envelope["sender"], envelope["arrival"]))
    lines = [f"{envelope['id']}  {_iso(envelope['arrival'])}  <{envelope['sender']}>{held}  "
             f"next {_iso(envelope['next_attempt'])}  expires {expires}"]
    most = f"/{_limits.max_attempts}" if _limits.max_attempts else ""
    for r in envelope["recipients"]:
        get = r.get
        reply = get("last_reply", "")
        reply = f"  ({reply})" if reply else ""
        lines.append(f"    {get('state', ''):9} {get('attempts', '')}{most} attempts  <{get('address', '')}>{reply}")
    return "\n".join(lines)


Entry = tuple  # (arrival, the message's text in the listing)
Corrupt = tuple  # (id, path of its envelope file, why it cannot be used)


def _entries(paths: list[str], as_json: bool) -> tuple[list[Entry], list[Corrupt]]:
    """The listing's entries for these envelope files, in the order of `paths`, and the files
    among them that are not usable envelopes (the daemon sets those aside when it starts)."""
    render = _json_text if as_json else _text_lines
    entries = []
    undecodable: list[tuple[int, str]] = []
    rendered = []
    for index, envelope in Spool.read_raw_envelopes(paths, undecodable):
        try:
            entries.append((envelope["arrival"], render(envelope)))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError):
            rendered.append(index)  # not an envelope mailhost wrote: say why below
    corrupt = [(_name(paths[index]), paths[index], reason) for index, reason in undecodable]
    for index in rendered:
        corrupt.append((_name(paths[index]), paths[index], _problem(paths[index])))
    return entries, corrupt


def _name(path: str) -> str:
    return os.path.basename(path)[:-5]


def _problem(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return envelope_file_problem(f.read(), _name(path)) or "not an envelope"
    except OSError as e:
        return f"cannot read it: {e.strerror}"


# A listing of 100,000 messages is CPU work (open/read/close, JSON, formatting): 2-3 s of
# one process on the benchmark machine. Threads did not help there (two threads reading took
# as long as one, or longer; the JSON work holds the GIL). Forked processes, each with its
# own share of the files, do when a CPU is free, and cost a few milliseconds when none is.
PARALLEL_FROM = 4000  # envelopes; fewer take well under 0.2 s in one process
MAX_PROCESSES = 4


def _processes() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_PROCESSES))


def listing_entries(spool: Spool, as_json: bool, processes: int | None = None) -> tuple[list[Entry], list[Corrupt]]:
    """Every message's entry, sorted as the listing shows them: by arrival, then in scan order;
    and every corrupt envelope, still in env/ or set aside in corrupt/, by id.

    With `processes` > 1 (by default one per CPU, for big queues), forked children each do a
    share of the envelope files and send their entries back marshalled through a pipe; a
    share whose child fails is done here instead, so the listing is complete either way."""
    collecting = gc.isenabled()
    gc.disable()  # 100,000s of new dicts and strings, no cycles: the collector would only walk them again and again
    try:
        return _listing_entries(spool, as_json, processes)
    finally:
        if collecting:
            gc.enable()


def _listing_entries(spool: Spool, as_json: bool, processes: int | None) -> tuple[list[Entry], list[Corrupt]]:
    paths = spool.envelope_files()
    if processes is None:
        processes = _processes() if len(paths) >= PARALLEL_FROM else 1
    size = -(-len(paths) // max(processes, 1)) or 1
    shares = [paths[start:start + size] for start in range(0, len(paths), size)]
    children = [(share, _fork(share, as_json)) for share in shares[1:]]
    entries, corrupt = _entries(shares[0], as_json) if shares else ([], [])
    for share, child in children:
        result = _collect(child)
        more, bad = result if result is not None else _entries(share, as_json)
        entries.extend(more)
        corrupt.extend(bad)
    # The entries are in scan order here, so a stable sort by arrival alone orders equal times
    # by scan position (as sorted() over raw_envelopes did); all-float keys sort fastest.
    entries.sort(key=itemgetter(0))
    corrupt.extend(spool.corrupt_entries())
    corrupt.sort()
    return entries, corrupt


def _fork(share: list[str], as_json: bool) -> tuple[int, int] | None:
    """A child that writes marshal.dumps(_entries(share)) to a pipe: (pid, read end), or None."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: never returns, never runs the parent's cleanups or flushes its stdout
        code = 1
        try:
            os.close(read_end)
            data = memoryview(marshal.dumps(_entries(share, as_json)))
            while data:
                data = data[os.write(write_end, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _collect(child: tuple[int, int] | None) -> tuple[list[Entry], list[Corrupt]] | None:
    """A child's entries, or None when it failed (then the parent does its share)."""
    if child is None:
        return None
    pid, read_end = child
    chunks = []
    try:
        while chunk := os.read(read_end, 1 << 20):
            chunks.append(chunk)
    except OSError:
        chunks = []
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    try:
        result = marshal.loads(b"".join(chunks))
    except (EOFError, ValueError, TypeError):
        return None
    if type(result) is not tuple or len(result) != 2 or not all(type(part) is list for part in result):
        return None
    return result


def queue_list(spool: Spool, as_json: bool, state_dir: Path, processes: int | None = None,
               limits: Limits | None = None) -> int:
    global _limits
    _limits = limits or Limits()
    # Raw JSON dicts, not Envelope objects, and several processes: `queue list` of 100,000
    # messages stays quick (bench/queue_scale.py). The spool is read directly even when the
    # daemon runs: it holds only ids and due times, not the recipients' states.
    _check_readable(spool, state_dir)
    entries, corrupt = listing_entries(spool, as_json, processes)
    try:
        paces = current_pace(state_dir)
    except DaemonNotRunning:
        paces = {}
    out = sys.stdout
    if as_json:
        # The same text as json.dumps({"messages": [...], "pace": paces, "corrupt": [...]}, ensure_ascii=False).
        corrupt_json = [{"id": name, "path": path, "reason": reason} for name, path, reason in corrupt]
        out.write('{"messages": [')
        out.write(", ".join([entry[1] for entry in entries]))
        out.write(f'], "pace": {json.dumps(paces, ensure_ascii=False)}, '
                  f'"corrupt": {json.dumps(corrupt_json, ensure_ascii=False)}}}\n')
        out.flush()
        return 0
    lines = [f"pace {group}: {values['rate']:.0f}/min (at most {values['max_rate']:.0f}/min, "
             f"{values['connections']:.0f} connections)"
             + (f", paused for {values['paused_for']:.0f}s after a block" if values.get("paused_for") else "")
             for group, values in paces.items()]
    lines.extend(entry[1] for entry in entries)
    # Not in the queue, not delivered: the operator has to look (README, "The queue").
    lines.extend(f"{name}  CORRUPT  {path}: {reason}" for name, path, reason in corrupt)
    lines.append(f"{len(entries)} messages in the queue")
    if corrupt:
        lines.append(f"{len(corrupt)} corrupt envelopes: not delivered; see {spool.corrupt}")
    out.write("\n".join(lines))
    out.write("\n")
    out.flush()
    return 0


def _check_readable(spool: Spool, state_dir: Path) -> None:
    """SpoolError when this user may not read the spool: the listing skips what it cannot read,
    and "0 messages" would be a wrong answer."""
    try:
        with os.scandir(spool.root / "env"):
            return
    except FileNotFoundError:
        return  # nothing was ever queued here
    except PermissionError:
        pass
    raise SpoolError(f"cannot read the queue in {spool.root}: permission denied "
                     f"(run this as root or as the owner of {state_dir})")


def queue_show(spool: Spool, queue_id: str) -> int:
    envelope = spool.load(queue_id)
    print(json.dumps(asdict(envelope), indent=2, ensure_ascii=False))
    message = spool.read_message(queue_id)
    end = message.find(b"\n\n")
    print()
    print(message[: end if end >= 0 else len(message)].decode("utf-8", "replace"))
    return 0
