"""`mailhost queue list`: the listing of a big queue, read in several processes, is the same
text, byte for byte, as the plain way of making it (every envelope through json.loads,
time.strftime per timestamp, sorted by arrival, one json.dumps)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from mailhost.cli import queue as queue_cli
from mailhost.queue.envelope import DEFERRED, DELIVERED, FAILED, Envelope, Recipient
from mailhost.queue.spool import Spool, new_queue_id

MAILHOST = Path(sys.executable).parent / "mailhost"


def reference_listing(spool: Spool, as_json: bool) -> str:
    """What `queue list` printed before it was made fast (kept here as the specification)."""

    def iso(epoch: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

    messages = []
    for e in sorted(spool.raw_envelopes(), key=lambda e: e["arrival"]):
        messages.append({
            "id": e["id"], "sender": e["sender"], "arrival": iso(e["arrival"]),
            "next_attempt": iso(e["next_attempt"]), "held": e.get("held", False),
            "expires": iso(e["arrival"] + 5 * 86400), "max_attempts": 0,
            "recipients": [{k: r.get(k, "") for k in ("address", "state", "attempts", "last_reply", "status")}
                           for r in e["recipients"]],
        })
    if as_json:
        return json.dumps({"messages": messages, "pace": {}, "corrupt": []}, ensure_ascii=False) + "\n"
    lines = []
    for m in messages:
        held = " HELD" if m["held"] else ""
        lines.append(f"{m['id']}  {m['arrival']}  <{m['sender']}>{held}  next {m['next_attempt']}  "
                     f"expires {m['expires']}")
        for r in m["recipients"]:
            reply = f"  ({r['last_reply']})" if r["last_reply"] else ""
            lines.append(f"    {r['state']:9} {r['attempts']} attempts  <{r['address']}>{reply}")
    lines.append(f"{len(messages)} messages in the queue")
    return "\n".join(lines) + "\n"


def fill(spool: Spool, count: int, seed: int = 7) -> list[Envelope]:
    """Envelopes of every shape the listing shows: states, replies with quotes, backslashes,
    non-ASCII and control characters, held ones, equal arrival times (order by scan), times
    before 1970 and fractions of a second on both sides of a whole second."""
    rng = random.Random(seed)
    base = 1_700_000_000.0
    envelopes = []
    for i in range(count):
        recipients = []
        for j in range(rng.randint(1, 4)):
            r = Recipient(f"u{i}.{j}@d{i % 7}.test")
            kind = rng.random()
            if kind < 0.3:
                r.state, r.attempts, r.status = DEFERRED, rng.randint(1, 9), "4.7.1"
                r.last_reply = f'451 4.7.1 "try" later \\ «{i}»\t\u2028'
            elif kind < 0.4:
                r.state, r.attempts, r.last_reply, r.status = DELIVERED, 1, "250 2.0.0 Ok", "2.0.0"
            elif kind < 0.45:
                r.state, r.attempts, r.last_reply, r.status = FAILED, 2, "connect to x[1.2.3.4]:25: refused", "5.1.1"
            recipients.append(r)
        arrival = base + rng.choice([0.0, 0.5, 0.999999, 1.0, i * 37.3, -i * 1000.7, -base - 1.5, 86399.9])
        envelope = Envelope(new_queue_id(), rng.choice(["", "a@b.test", "ünï@exämple.test", 'q"uote@x.test']),
                            recipients, arrival=arrival, next_attempt=arrival + rng.choice([0, 59.9999, 3600, 1e6]),
                            held=i % 11 == 0)
        path = spool.envelope_path(envelope.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(envelope.to_json())  # (no fsync: only the reading is tested)
        envelopes.append(envelope)
    return envelopes


def listing(spool: Spool, as_json: bool, processes: int | None) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert queue_cli.queue_list(spool, as_json, spool.root / "no-daemon-here", processes=processes) == 0
    return out.getvalue()


@pytest.mark.parametrize("processes", [1, 2, 3, 8])
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_listing_is_the_same_text_in_one_or_several_processes(tmp_path, as_json, processes):
    spool = Spool(tmp_path)
    envelopes = fill(spool, 600)
    expected = reference_listing(spool, as_json)
    assert listing(spool, as_json, processes) == expected
    if as_json:
        listed = json.loads(expected)["messages"]
        assert sorted(m["id"] for m in listed) == sorted(e.id for e in envelopes)
    else:
        assert expected.endswith("\n600 messages in the queue\n")


def test_listing_shows_what_is_not_an_envelope_as_corrupt(tmp_path):
    """Files in env/ that are not envelopes are not messages of the listing, but they are listed,
    each with the reason (they would otherwise vanish unseen: the daemon does not deliver them)."""
    spool = Spool(tmp_path)
    envelopes = fill(spool, 50)
    broken = {}
    for text in (b"", b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"id": "x", "sender": "", "arrival": "soon", '
                 b'"next_attempt": 0, "recipients": []}', b"\xff\xfe", b'{"id": "AB", "sender": "a@b.test", "arr'):
        queue_id = new_queue_id()
        path = spool.envelope_path(queue_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        broken[queue_id] = text
    set_aside = new_queue_id()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / f"{set_aside}.json").write_bytes(b"\x00\x00garbage")
    for as_json in (True, False):
        for processes in (1, 3):
            out = listing(spool, as_json, processes)
            if as_json:
                listed = json.loads(out)
                assert sorted(m["id"] for m in listed["messages"]) == sorted(e.id for e in envelopes)
                corrupt = {c["id"]: c for c in listed["corrupt"]}
                assert sorted(corrupt) == sorted([*broken, set_aside])
                assert corrupt[set_aside]["path"] == str(tmp_path / "corrupt" / f"{set_aside}.json")
                reasons = {broken[i]: c["reason"] for i, c in corrupt.items() if i in broken}
                assert reasons[b""] == "empty file"
                assert reasons[b'{"id": "AB", "sender": "a@b.test", "arr'].startswith("cut short after 39 bytes")
                assert reasons[b"[1, 2]"] == "not an envelope: a JSON list, not an object"
                assert reasons[b"{not json"].startswith("not JSON")
                assert all(reason for reason in reasons.values())
            else:
                assert out.endswith("\n50 messages in the queue\n8 corrupt envelopes: not delivered; "
                                    f"see {tmp_path / 'corrupt'}\n")
                assert f"{set_aside}  CORRUPT  {tmp_path / 'corrupt' / set_aside}.json: not JSON" in out


def test_unusual_values_are_listed_as_json_dumps_would(tmp_path):
    """Envelopes mailhost did not write itself (no "held", a missing recipient field, a float
    count) go the slow way and still come out as before."""
    spool = Spool(tmp_path)
    odd = [
        {"id": new_queue_id(), "sender": "a@b.test", "arrival": 5.5, "next_attempt": 7, "recipients": [
            {"address": "x@y.test", "state": "pending", "attempts": 1.0}]},
        {"id": new_queue_id(), "sender": "a@b.test", "arrival": 5, "next_attempt": 7, "held": 1,
         "recipients": [{"address": "x@y.test", "state": "pending", "attempts": True, "last_reply": None,
                         "status": ""}]},
    ]
    for raw in odd:
        path = spool.envelope_path(raw["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw))
    assert listing(spool, True, 1) == reference_listing(spool, True)
    assert [m["held"] for m in json.loads(listing(spool, True, 1))["messages"]] == [1, False]


def test_a_failing_child_process_leaves_its_share_to_the_parent(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    fill(spool, 300)
    parent = os.getpid()
    entries = queue_cli._entries

    def dies_in_a_child(*args):
        if os.getpid() != parent:
            os._exit(3)
        return entries(*args)

    monkeypatch.setattr(queue_cli, "_entries", dies_in_a_child)
    assert listing(spool, True, 3) == reference_listing(spool, True)


def test_timestamps_as_strftime_gives_them():
    rng = random.Random(3)
    values = [0, 0.5, -0.5, -1, 59.999999, 86399.99, 86400, 951782400.25, 4102444799.9, -86400.5]
    values += [rng.uniform(-3e9, 5e9) for _ in range(5000)]
    for epoch in values:
        assert queue_cli._iso(epoch) == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)), epoch


def test_cli_queue_list_with_the_daemon_stopped(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "mailhost.toml"
    config.write_text(f"""
[server]
hostname = "mail.example.test"
state_dir = "{state}"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "{tmp_path}/mail"
""")
    spool = Spool(state / "spool")
    fill(spool, queue_cli.PARALLEL_FROM + 100)  # enough for the listing to fork
    for as_json, flag in ((True, ["--json"]), (False, [])):
        result = subprocess.run([str(MAILHOST), "--config", str(config), "queue", "list", *flag],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == reference_listing(spool, as_json)


def _site(tmp_path: Path) -> Path:
    config = tmp_path / "mailhost.toml"
    config.write_text(f"""
[server]
hostname = "mail.example.test"
state_dir = "{tmp_path / "state"}"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "{tmp_path}/mail"
""")
    return config


@pytest.mark.parametrize("command", ["show", "delete", "hold", "release", "flush"])
@pytest.mark.parametrize("queue_id", ["../../victim", "../x", "AA/../../../victim", "A" * 5000, "",
                                      "AAAAAAAAAAAAAAA\n"])
def test_queue_ids_from_the_command_line_stay_in_the_spool(tmp_path, command, queue_id):
    # Before: `queue delete ../../../tmp/victim` (daemon stopped) removed files outside the
    # spool, `queue show ../x` read them, and a 5000-character id was a traceback.
    config = _site(tmp_path)
    spool = Spool(tmp_path / "state" / "spool")
    [kept] = fill(spool, 1)
    (tmp_path / "state" / "spool" / "env").mkdir(exist_ok=True)
    victim = tmp_path / "victim"
    victim.with_suffix(".json").write_bytes(kept.to_json())  # where ../../victim's envelope would be
    victim.write_bytes(b"Subject: not in the spool\n\nx\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = subprocess.run([str(MAILHOST), "--config", str(config), "queue", command, queue_id],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is not a queue id" in result.stderr and len(result.stderr) < 300
    assert result.stdout == ""
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_queue_id_may_be_typed_in_lower_case(tmp_path):
    config = _site(tmp_path)
    spool = Spool(tmp_path / "state" / "spool")
    [queued] = fill(spool, 1)
    result = subprocess.run([str(MAILHOST), "--config", str(config), "queue", "hold", queued.id.lower()],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{queued.id}: held")
    assert spool.load(queued.id).held
