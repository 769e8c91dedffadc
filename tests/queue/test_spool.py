"""The spool keeps what it acknowledged, and only that."""

from __future__ import annotations

import json
import os

import pytest

from mailhost.queue.envelope import DEFERRED, Envelope, Recipient
from mailhost.queue import spool as spool_module
from mailhost.queue.spool import DueIndex, MessageMissing, Spool, SpoolError, new_queue_id


def envelope(recipients: list[str], when: float = 100.0) -> Envelope:
    return Envelope(new_queue_id(), "sender@example.test", [Recipient(r) for r in recipients], arrival=when, next_attempt=when)


def test_store_then_load_round_trips(tmp_path):
    spool = Spool(tmp_path)
    original = envelope(["a@remote.test", "b@remote.test"])
    original.body_8bit = True
    spool.store(original, [b"Received: x\n", b"Subject: hi\n\nbody\n"])
    assert spool.load(original.id) == original
    assert spool.read_message(original.id) == b"Received: x\nSubject: hi\n\nbody\n"
    assert list(spool.ids()) == [original.id]


def test_many_recipients_one_message_file_in_hashed_folders(tmp_path):
    spool = Spool(tmp_path)
    first = envelope([f"user{i}@remote{i}.test" for i in range(500)])
    spool.store(first, [b"x\n"])
    files = [p for p in (tmp_path / "msg").rglob("*") if p.is_file()]
    assert files == [tmp_path / "msg" / first.id[:2] / first.id]
    assert spool.envelope_path(first.id).parent.name == first.id[:2]


def test_update_replaces_atomically(tmp_path):
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])
    spool.store(queued, [b"x\n"])
    queued.recipients[0].state = DEFERRED
    queued.recipients[0].last_reply = "451 4.7.1 later"
    spool.update(queued)
    assert spool.load(queued.id).recipients[0].last_reply == "451 4.7.1 later"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_remove_and_unknown_ids(tmp_path):
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])
    spool.store(queued, [b"x\n"])
    spool.remove(queued.id)
    assert list(spool.ids()) == []
    assert not spool.message_path(queued.id).exists()
    with pytest.raises(SpoolError):
        spool.load(queued.id)
    with pytest.raises(SpoolError):
        spool.remove(queued.id)


@pytest.mark.parametrize("sync, directory_syncs", [(True, 1), (False, 0)])
def test_remove_syncs_its_folder_only_when_asked(tmp_path, monkeypatch, sync, directory_syncs):
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])
    spool.store(queued, [b"x\n"])
    synced: list = []
    monkeypatch.setattr(spool_module, "fsync_directory", synced.append)
    spool.remove(queued.id, sync=sync)
    assert list(spool.ids()) == [] and not spool.message_path(queued.id).exists()
    assert synced == [spool.envelope_path(queued.id).parent] * directory_syncs


def test_an_envelope_without_its_message_says_so(tmp_path):
    # What an unsynced removal can leave after a crash: the envelope came back, the message did not.
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])
    spool.store(queued, [b"x\n"])
    os.unlink(spool.message_path(queued.id))
    with pytest.raises(MessageMissing):
        spool.load_with_message(queued.id)
    spool.remove(queued.id)
    assert list(spool.ids()) == []


def test_recover_removes_interrupted_writes_and_keeps_committed(tmp_path):
    spool = Spool(tmp_path)
    kept = envelope(["a@remote.test"])
    spool.store(kept, [b"kept\n"])
    # A crash after the message file was renamed but before its envelope was:
    orphan = new_queue_id()
    spool.message_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    spool.message_path(orphan).write_bytes(b"never acknowledged\n")
    (tmp_path / "tmp" / "half-written.msg").write_bytes(b"partial")
    removed = spool.recover()
    assert sorted(removed) == sorted([f"tmp/half-written.msg", f"msg/{orphan[:2]}/{orphan}"])
    assert [e.id for e in spool.envelopes()] == [kept.id]
    assert spool.read_message(kept.id) == b"kept\n"


def test_store_failure_leaves_nothing(tmp_path):
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])

    def broken():
        yield b"start"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        spool.store(queued, broken())
    assert list(spool.ids()) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_files_are_private(tmp_path):
    spool = Spool(tmp_path)
    queued = envelope(["a@remote.test"])
    spool.store(queued, [b"x\n"])
    for path in (spool.message_path(queued.id), spool.envelope_path(queued.id)):
        assert os.stat(path).st_mode & 0o077 == 0


def test_due_index_orders_holds_and_reschedules():
    index = DueIndex()
    index.schedule("late", 30.0)
    index.schedule("early", 10.0)
    index.schedule("middle", 20.0)
    index.schedule("middle", 40.0)  # rescheduled: the old time no longer counts
    index.hold("late")
    assert len(index) == 3
    assert index.next_time() == 10.0
    assert index.pop_due(25.0) == "early"
    assert index.pop_due(25.0) is None
    assert index.pop_due(100.0) == "middle"
    assert index.pop_due(100.0) is None  # "late" is held
    index.schedule("late", 50.0)  # released
    assert index.pop_due(100.0) == "late"
    assert len(index) == 0


def test_read_raw_envelopes_reads_every_envelope_in_scan_order(tmp_path):
    spool = Spool(tmp_path)
    queued = [envelope([f"r{i}@remote.test"], when=float(i)) for i in range(40)]
    for e in queued:
        spool.store(e, [b"x\n"])
    paths = spool.envelope_files()
    assert sorted(paths) == sorted(str(spool.envelope_path(e.id)) for e in queued)
    read = Spool.read_raw_envelopes(paths)
    assert [index for index, _ in read] == list(range(40))
    assert [raw for _, raw in read] == [json.loads(open(path, "rb").read()) for path in paths]
    assert [raw["id"] for _, raw in read] == [e["id"] for e in spool.raw_envelopes()]


def test_read_raw_envelopes_leaves_out_missing_and_broken_files(tmp_path):
    spool = Spool(tmp_path)
    good = [envelope(["a@remote.test"]) for _ in range(3)]
    for e in good:
        spool.store(e, [b"x\n"])
    broken = new_queue_id()
    spool.envelope_path(broken).parent.mkdir(parents=True, exist_ok=True)
    spool.envelope_path(broken).write_bytes(b'{"id": "' + broken.encode() + b'", "sender":')
    paths = spool.envelope_files()
    gone = good[1]
    spool.remove(gone.id)  # removed between the scan and the read, as by the running daemon
    read = Spool.read_raw_envelopes(paths)
    assert sorted(raw["id"] for _, raw in read) == sorted([good[0].id, good[2].id])
    assert all(paths[index].endswith(f"{raw['id']}.json") for index, raw in read)


def test_read_raw_envelopes_does_not_shift_envelopes_between_files(tmp_path):
    """Two broken files that would join into one object, and one that splits into two, are
    not read as three envelopes under the wrong names."""
    spool = Spool(tmp_path)
    names = [new_queue_id() for _ in range(3)]
    texts = [b'{"id":"%s","x":[1' % names[0].encode(), b'{"id":"%s"}]}' % names[1].encode(),
             b'{"id":"%s"},{"id":"%s"}' % (names[1].encode(), names[2].encode())]
    for name, text in zip(names, texts):
        spool.envelope_path(name).parent.mkdir(parents=True, exist_ok=True)
        spool.envelope_path(name).write_bytes(text)
    paths = [str(spool.envelope_path(name)) for name in names]
    assert Spool.read_raw_envelopes(paths) == []


def test_read_raw_envelopes_reads_big_envelopes_to_the_end(tmp_path):
    spool = Spool(tmp_path)
    big = envelope([f"recipient-number-{i}@remote{i}.test" for i in range(2000)])
    spool.store(big, [b"x\n"])
    assert os.path.getsize(spool.envelope_path(big.id)) > 3 * 65536
    [(index, raw)] = Spool.read_raw_envelopes(spool.envelope_files())
    assert Envelope.from_json(json.dumps(raw).encode()) == big


def test_envelope_files_of_an_empty_spool(tmp_path):
    assert Spool(tmp_path / "none").envelope_files() == []
    assert Spool.read_raw_envelopes([]) == []


# --- corrupt envelopes ------------------------------------------------------------------------

CORRUPT = {
    "empty": b"",
    "truncated": b'{"id": "%s", "sender": "a@b.test", "recipients": [{"addr',
    "garbage": b"\x00\x9f\xffGIF89a\x00\x00",
}


def plant(spool: Spool, text: bytes, message: bytes | None = b"Subject: x\n\nbody\n") -> str:
    """An envelope file with `text` (and a message file) in the spool, as a bad copy leaves them."""
    queue_id = new_queue_id()
    path = spool.envelope_path(queue_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace(b"%s", queue_id.encode()) if b"%s" in text else text)
    if message is not None:
        spool.message_path(queue_id).parent.mkdir(parents=True, exist_ok=True)
        spool.message_path(queue_id).write_bytes(message)
    return queue_id


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_corrupt_envelope_says_why_and_is_set_aside_with_its_message(tmp_path, kind):
    spool = Spool(tmp_path)
    good = envelope(["a@remote.test"])
    spool.store(good, [b"x\n"])
    queue_id = plant(spool, CORRUPT[kind])

    with pytest.raises(SpoolError) as raised:
        spool.load(queue_id)
    reason = raised.value.reason
    assert reason.startswith({"empty": "empty file", "truncated": "cut short after ", "garbage": "not JSON: "}[kind])
    assert str(raised.value) == f"{queue_id}: unreadable envelope ({reason})"

    where = spool.quarantine(spool.envelope_path(queue_id))
    assert where == str(tmp_path / "corrupt" / f"{queue_id}.json")
    assert (tmp_path / "corrupt" / f"{queue_id}.json").read_bytes() == spool_text(CORRUPT[kind], queue_id)
    assert (tmp_path / "corrupt" / queue_id).read_bytes() == b"Subject: x\n\nbody\n"
    assert not spool.envelope_path(queue_id).exists() and not spool.message_path(queue_id).exists()
    assert list(spool.ids()) == [good.id]  # the rest of the queue is untouched
    assert spool.recover() == []  # nothing left behind that looks like an interrupted write
    assert spool.corrupt_count() == 1
    [(listed_id, path, listed_reason)] = spool.corrupt_entries()
    assert (listed_id, path, listed_reason) == (queue_id, where, reason)


def spool_text(text: bytes, queue_id: str) -> bytes:
    return text.replace(b"%s", queue_id.encode()) if b"%s" in text else text


def test_setting_aside_syncs_both_folders_and_moves_the_message_first(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    queue_id = plant(spool, b"")
    events = []
    rename = os.rename
    monkeypatch.setattr(spool_module.os, "rename", lambda a, b: (events.append(("rename", str(a))), rename(a, b)))
    monkeypatch.setattr(spool_module, "fsync_directory", lambda path: events.append(("sync", str(path))))
    spool.quarantine(str(spool.envelope_path(queue_id)))
    corrupt = str(tmp_path / "corrupt")
    assert events == [
        ("rename", str(spool.message_path(queue_id))), ("sync", corrupt), ("sync", str(spool.message_path(queue_id).parent)),
        ("rename", str(spool.envelope_path(queue_id))), ("sync", corrupt), ("sync", str(spool.envelope_path(queue_id).parent)),
    ]


def test_an_envelope_without_a_message_file_is_set_aside_alone(tmp_path):
    spool = Spool(tmp_path)
    queue_id = plant(spool, b"{}", message=None)
    spool.quarantine(spool.envelope_path(queue_id))
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [f"{queue_id}.json"]
    assert spool.corrupt_entries()[0][2] == "not an envelope: no id"


@pytest.mark.parametrize("raw, problem", [
    ([], "not an envelope: a JSON list, not an object"),
    ({}, "not an envelope: no id"),
    ({"id": "NAME", "sender": "", "recipients": [], "arrival": "soon", "next_attempt": 0},
     "not an envelope: arrival is 'soon'"),
    ({"id": "OTHER", "sender": "", "recipients": [], "arrival": 1, "next_attempt": 0},
     "its id 'OTHER' is not its file name"),
    ({"id": "NAME", "sender": "", "recipients": ["x@y.test"], "arrival": 1, "next_attempt": 0},
     "not an envelope: recipient 'x@y.test'"),
    ({"id": "NAME", "sender": "", "recipients": [{"address": "x@y.test"}], "arrival": 1, "next_attempt": 0.5}, None),
])
def test_raw_envelope_problems(raw, problem):
    assert spool_module.raw_envelope_problem(raw, "NAME") == problem


def test_read_raw_envelopes_says_why_files_did_not_decode(tmp_path):
    spool = Spool(tmp_path)
    good = envelope(["a@remote.test"])
    spool.store(good, [b"x\n"])
    ids = {kind: plant(spool, text) for kind, text in CORRUPT.items()}
    ids["list"] = plant(spool, b"[1]")
    paths = spool.envelope_files()
    undecodable: list = []
    read = Spool.read_raw_envelopes(paths, undecodable)
    assert [raw["id"] for _, raw in read] == [good.id]
    reasons = {os.path.basename(paths[index])[:-5]: reason for index, reason in undecodable}
    assert reasons[ids["empty"]] == "empty file"
    assert reasons[ids["truncated"]].startswith("cut short after")
    assert reasons[ids["garbage"]].startswith("not JSON: ")
    assert reasons[ids["list"]] == "not an envelope: a JSON list, not an object"


@pytest.mark.parametrize("name", [".json", "x.json", "A.json", "..json"])
def test_an_envelope_file_with_a_name_that_is_no_queue_id_is_set_aside_alone(tmp_path, name):
    """Its name says nothing about a message file: nothing else moves (".json" once named msg/ itself)."""
    spool = Spool(tmp_path)
    good = envelope(["a@remote.test"])
    spool.store(good, [b"x\n"])
    stray = tmp_path / "env" / good.id[:2] / name
    stray.write_bytes(b"junk")
    assert spool.quarantine(stray) == str(tmp_path / "corrupt" / name)
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [name]
    assert spool.load_with_message(good.id) == (good, b"x\n")


def test_only_envelope_files_of_the_spool_are_set_aside(tmp_path):
    spool = Spool(tmp_path)
    elsewhere = tmp_path / "msg" / "AB" / "AB.json"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(b"")
    with pytest.raises(ValueError):
        spool.quarantine(elsewhere)
    assert elsewhere.exists()


def test_an_envelope_in_the_wrong_folder_cannot_be_scheduled():
    raw = {"id": "ABCD", "sender": "", "recipients": [], "arrival": 1, "next_attempt": 1}
    assert spool_module.raw_envelope_problem(raw, "ABCD", "AB") is None
    assert spool_module.raw_envelope_problem(raw, "ABCD", "CD") == "not in its folder env/AB/"


def test_stage_puts_nothing_in_place_until_published(tmp_path):
    spool = Spool(tmp_path / "spool")
    env = envelope(["a@x.test"])
    staged = spool.stage(env, [b"Subject: staged\n\n", b"body\n"])
    # Written under temporary names only: a crash now leaves nothing the queue would send.
    assert not spool.envelope_path(env.id).exists() and not spool.message_path(env.id).exists()
    staged.publish()
    assert spool.load(env.id).recipients[0].address == "a@x.test"
    assert spool.read_message(env.id) == b"Subject: staged\n\nbody\n"
    staged.undo()  # a failed sync after the renames: nothing of it stays
    assert not spool.envelope_path(env.id).exists() and not spool.message_path(env.id).exists()
    assert list((spool.root / "tmp").iterdir()) == []


def test_read_whole_reads_files_larger_than_one_read(tmp_path):
    path = tmp_path / "big"
    data = os.urandom(spool_module.FIRST_READ * 3 + 17)
    path.write_bytes(data)
    assert spool_module.read_whole(path) == data
    (tmp_path / "exact").write_bytes(data[:spool_module.FIRST_READ])
    assert spool_module.read_whole(tmp_path / "exact") == data[:spool_module.FIRST_READ]
    with pytest.raises(FileNotFoundError):
        spool_module.read_whole(tmp_path / "missing")
