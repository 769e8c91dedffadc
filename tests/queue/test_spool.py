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
