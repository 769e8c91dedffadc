"""Envelopes as the spool stores them: what is written loads back, and so does what older
versions of mailhost wrote."""

from __future__ import annotations

import json

import pytest

from mailhost.queue.envelope import DEFERRED, Envelope, Recipient
from mailhost.queue.spool import Spool

# An envelope as mailhost wrote it while Envelope and Recipient still had the RFC 3461
# fields (ret, envid; notify, orcpt): nothing set them, so they were null.
OLD_ENVELOPE = (
    '{"id":"0A1B2C3D4E5F","sender":"alice@example.test","recipients":['
    '{"address":"bob@remote.test","state":"deferred","attempts":2,"last_reply":"451 4.7.1 later",'
    '"status":"4.7.1","remote_mta":"mx1.remote.test","notify":null,"orcpt":null,"bounced":false},'
    '{"address":"carol@remote.test","state":"pending","attempts":0,"last_reply":"","status":"",'
    '"remote_mta":"","notify":null,"orcpt":null,"bounced":false}],'
    '"arrival":1700000000.0,"next_attempt":1700000600.0,"client":"client.example.test ([192.0.2.7])",'
    '"body_8bit":true,"smtputf8":false,"ret":null,"envid":null,"delay_warned":false,"held":false,"extra":{}}'
)

EXPECTED = Envelope(
    id="0A1B2C3D4E5F",
    sender="alice@example.test",
    recipients=[
        Recipient("bob@remote.test", state=DEFERRED, attempts=2, last_reply="451 4.7.1 later", status="4.7.1",
                  remote_mta="mx1.remote.test"),
        Recipient("carol@remote.test"),
    ],
    arrival=1700000000.0,
    next_attempt=1700000600.0,
    client="client.example.test ([192.0.2.7])",
    body_8bit=True,
)


def with_dsn_values(text: str) -> str:
    """The same envelope with the RFC 3461 fields set, as a hand-edited or future file might have them."""
    raw = json.loads(text)
    raw.update(ret="FULL", envid="QQ314159")
    for recipient in raw["recipients"]:
        recipient.update(notify="SUCCESS,FAILURE", orcpt="rfc822;" + recipient["address"])
    return json.dumps(raw)


@pytest.mark.parametrize("text", [OLD_ENVELOPE, with_dsn_values(OLD_ENVELOPE)], ids=["null", "set"])
def test_an_envelope_with_the_old_dsn_fields_loads(text: str) -> None:
    assert Envelope.from_json(text.encode()) == EXPECTED


def test_an_old_envelope_in_the_spool_loads_and_is_written_back_without_them(tmp_path) -> None:
    spool = Spool(tmp_path)
    path = spool.envelope_path(EXPECTED.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD_ENVELOPE)
    loaded = spool.load(EXPECTED.id)
    assert loaded == EXPECTED
    spool.update(loaded)
    written = json.loads(path.read_bytes())
    assert not {"ret", "envid"} & written.keys()
    assert all(not {"notify", "orcpt"} & r.keys() for r in written["recipients"])
    assert spool.load(EXPECTED.id) == EXPECTED


def test_to_json_round_trips() -> None:
    assert Envelope.from_json(EXPECTED.to_json()) == EXPECTED
