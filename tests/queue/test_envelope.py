"""Envelopes as the spool stores them: what is written loads back, and so does what older
versions of mailhost wrote."""

from __future__ import annotations

import json

import pytest

from mailhost.queue.envelope import DEFERRED, Envelope, Recipient
from mailhost.queue.spool import Spool

# An envelope as mailhost wrote it before the DSN extension: the RFC 3461 fields (ret, envid;
# notify, orcpt) null, as nothing set them.
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


WITHOUT_DSN_FIELDS = json.dumps({
    **{k: v for k, v in json.loads(OLD_ENVELOPE).items() if k not in ("ret", "envid")},
    "recipients": [{k: v for k, v in r.items() if k not in ("notify", "orcpt")}
                   for r in json.loads(OLD_ENVELOPE)["recipients"]],
})


def with_dsn_values(text: str) -> str:
    """The same envelope with the RFC 3461 fields set, NOTIFY written as RFC 3461 writes it."""
    raw = json.loads(text)
    raw.update(ret="FULL", envid="QQ314159")
    for recipient in raw["recipients"]:
        recipient.update(notify="SUCCESS,FAILURE", orcpt="rfc822;" + recipient["address"])
    return json.dumps(raw)


@pytest.mark.parametrize("text", [OLD_ENVELOPE, WITHOUT_DSN_FIELDS], ids=["null", "absent"])
def test_an_envelope_written_before_the_dsn_extension_loads(text: str) -> None:
    assert Envelope.from_json(text.encode()) == EXPECTED


def test_an_envelope_with_dsn_values_loads_them() -> None:
    loaded = Envelope.from_json(with_dsn_values(OLD_ENVELOPE).encode())
    assert (loaded.ret, loaded.envid) == ("FULL", "QQ314159")
    assert [(r.notify, r.orcpt) for r in loaded.recipients] == [
        (["SUCCESS", "FAILURE"], "rfc822;bob@remote.test"), (["SUCCESS", "FAILURE"], "rfc822;carol@remote.test")]
    assert loaded.recipients[0].wants("SUCCESS") and not loaded.recipients[0].wants("DELAY")
    assert Envelope.from_json(loaded.to_json()) == loaded


def test_without_notify_failures_and_delays_are_reported() -> None:
    recipient = Recipient("bob@remote.test")
    assert recipient.wants("FAILURE") and recipient.wants("DELAY") and not recipient.wants("SUCCESS")
    assert not Recipient("bob@remote.test", notify=["NEVER"]).wants("FAILURE")


def test_an_old_envelope_in_the_spool_loads_and_is_written_back(tmp_path) -> None:
    spool = Spool(tmp_path)
    path = spool.envelope_path(EXPECTED.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD_ENVELOPE)
    loaded = spool.load(EXPECTED.id)
    assert loaded == EXPECTED
    spool.update(loaded)
    assert spool.load(EXPECTED.id) == EXPECTED


def test_to_json_round_trips() -> None:
    assert Envelope.from_json(EXPECTED.to_json()) == EXPECTED
