"""Envelope files in the spool that cannot be read (empty, cut short, garbage) are set aside in
spool/corrupt/ with their messages at start, logged as errors, listed, and counted: never lost unseen."""

from __future__ import annotations

import json
import re
import time

import pytest

from mailhost.multiproc.shard import Shard
from mailhost.queue.envelope import Envelope, Recipient
from mailhost.queue.spool import Spool, new_queue_id
from tests.e2e.conftest import free_port
from tests.e2e.test_metrics import scrape, value
from tests.e2e.test_sending import wait_for

BROKEN = {
    "empty": b"",
    "truncated": b'{"id":"%s","sender":"alice@example.test","recipients":[{"address":"bob@remote.te',
    "garbage": b"\x1f\x8b\x08\x00\xff\xfe garbage \x00\x00",
}


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_envelopes_are_set_aside_logged_listed_and_counted(make_daemon, workers):
    port = free_port()
    # With workers, each process sets aside the corrupt envelopes of its own shard.
    daemon = make_daemon(start=False, prelude=f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n', workers=workers)
    spool = Spool(daemon.root / "state" / "spool")
    later = time.time() + 86400
    good = Envelope(new_queue_id(), "alice@example.test", [Recipient("bob@remote.test")], time.time(), later)
    spool.store(good, [b"Subject: good\n\nHello.\n"])
    broken = {}
    for n, (kind, text) in enumerate(BROKEN.items()):
        queue_id = Shard(n % workers, workers).new_queue_id()
        for path, data in ((spool.envelope_path(queue_id), text.replace(b"%s", queue_id.encode())),
                           (spool.message_path(queue_id), f"Subject: {kind}\n\nHello.\n".encode())):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        broken[queue_id] = kind

    # Listed even before a daemon has seen them (still in env/).
    listing = json.loads(daemon.cli("queue", "list", "--json").stdout)
    assert [m["id"] for m in listing["messages"]] == [good.id]
    assert sorted(c["id"] for c in listing["corrupt"]) == sorted(broken)

    daemon.start()
    wait_for(lambda: daemon.log().count("queue loaded") == workers, timeout=30, what="every process's queue loaded")
    corrupt = daemon.root / "state" / "spool" / "corrupt"
    for queue_id, kind in broken.items():
        assert (corrupt / queue_id).read_bytes() == f"Subject: {kind}\n\nHello.\n".encode()
        assert (corrupt / f"{queue_id}.json").read_bytes() == BROKEN[kind].replace(b"%s", queue_id.encode())
        assert not spool.envelope_path(queue_id).exists() and not spool.message_path(queue_id).exists()
        [line] = [line for line in daemon.log().splitlines() if queue_id in line]
        assert re.search(rf"#error( worker \d)?\] {queue_id}: corrupt envelope \(", line), line
    assert "(empty file)" in daemon.log() and "(cut short after " in daemon.log() and "(not JSON: " in daemon.log()

    listing = json.loads(daemon.cli("queue", "list", "--json").stdout)
    assert [m["id"] for m in listing["messages"]] == [good.id]
    assert {c["id"]: c["path"] for c in listing["corrupt"]} == {i: str(corrupt / f"{i}.json") for i in broken}
    text = daemon.cli("queue", "list").stdout
    assert all(f"{queue_id}  CORRUPT  {corrupt / queue_id}.json: " in text for queue_id in broken)
    assert text.endswith(f"1 messages in the queue\n3 corrupt envelopes: not delivered; see {corrupt}\n")

    assert value(scrape(port), "mailhost_queue_corrupt") == 3
    assert value(scrape(port), "mailhost_queue_messages") == 1
