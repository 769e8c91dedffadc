"""`mailhost suppress`: classes, sender-domain scopes, CSV export and import, and what a
user sees when the input is wrong (one line per problem, exit 1, nothing half done)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mailhost.cli.main import main
from mailhost.feedback.suppression import BounceReport, SuppressionList
from mailhost.queue.envelope import DEFERRED, Envelope, Recipient
from mailhost.queue.spool import Spool, new_queue_id

from tests.cli.test_main import CONFIG


@pytest.fixture
def run(tmp_path: Path, capsys, monkeypatch):
    config = tmp_path / "mailhost.toml"
    config.write_text(CONFIG + '\n[queue]\nmax_attempts = 8\nlifetime = "5d"\nmarketing_lifetime = "1d"\n'
                      '[unsubscribe]\nsenders = ["@news.example.test"]\n')

    def call(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    call.state = tmp_path / "state"  # type: ignore[attr-defined]
    return call


def listed(run, *args: str) -> list[dict]:
    code, out, _ = run("suppress", "list", "--json", *args)
    assert code == 0
    return json.loads(out)["suppressed"]


def test_list_shows_the_class_and_the_reply_with_the_interface_keys(run):
    suppression = SuppressionList(run.state / "suppression.json")
    suppression.record_bounce(BounceReport("gone@gmail.com", "5.1.1", "failed",
                                           "550 5.1.1 The email account that you tried to reach does not exist", True))
    [entry] = listed(run)
    assert entry["address"] == "gone@gmail.com" and entry["class"] == "invalid_recipient"
    assert entry["reason"].startswith("550 5.1.1 The email account") and entry["source"] == "bounce"
    assert entry["since"] == entry["date"] and entry["status"] == "5.1.1"  # the old keys stay
    code, out, _ = run("suppress", "list")
    assert "gone@gmail.com  invalid_recipient  5.1.1" in out and "does not exist" in out


def test_class_and_scope_on_add_list_and_remove(run):
    assert run("suppress", "add", "a@x.test", "--class", "mailbox_full")[0] == 0
    assert run("suppress", "add", "b@x.test", "--scope", "News.Example.test")[0] == 0
    assert [e["address"] for e in listed(run, "--class", "mailbox_full")] == ["a@x.test"]
    assert [(e["address"], e["scope"]) for e in listed(run, "--scope", "news.example.test")] == [
        ("b@x.test", "news.example.test")]
    code, _, err = run("suppress", "remove", "b@x.test", "--scope", "other.test")
    assert code == 1 and err.count("\n") == 1 and "not suppressed for mail from other.test" in err
    assert run("suppress", "remove", "b@x.test", "--scope", "news.example.test")[0] == 0
    assert [e["address"] for e in listed(run)] == ["a@x.test"]


def test_a_bad_class_is_one_line_and_exit_1(run):
    code, out, err = run("suppress", "list", "--class", "bouncy")
    assert (code, out) == (1, "") and err.count("\n") == 1 and "--class 'bouncy'" in err


def test_export_then_import_moves_the_list(run, tmp_path):
    run("suppress", "add", "a@x.test", "--class", "invalid_recipient", "--reason", 'said "no", twice')
    run("suppress", "add", "b@x.test", "--scope", "news.example.test")
    code, out, _ = run("suppress", "export")
    assert code == 0 and out.splitlines()[0] == "address,class,reason,source,since,scope,status"
    exported = out
    before = listed(run)
    (run.state / "suppression.json").unlink()
    code, out, _ = run("suppress", "import", "-", stdin=exported)
    assert code == 0 and "imported 2 entries" in out
    assert listed(run) == before
    target = tmp_path / "list.csv"
    assert run("suppress", "export", str(target), "--class", "invalid_recipient")[0] == 0
    assert len(target.read_text().splitlines()) == 2


def test_import_checks_every_row_and_imports_nothing_from_a_bad_file(run, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("address,class,since\n"
                   "ok@x.test,mailbox_full,2026-01-31T12:00:00Z\n"
                   "not an address,,\n"
                   "c@x.test,bouncy,\n"
                   "d@x.test,,yesterday\n"
                   "e@x.test,\n")
    code, out, err = run("suppress", "import", str(bad))
    assert code == 1 and out == ""
    assert f"{bad}:3: not a mail address" in err and f"{bad}:4: class 'bouncy'" in err
    assert f"{bad}:5: since 'yesterday'" in err and f"{bad}:6: 2 fields, the header has 3" in err
    assert "Traceback" not in err and "nothing imported" in err
    assert listed(run) == []
    bad.write_text("email\nx@y.test\n")
    code, _, err = run("suppress", "import", str(bad))
    assert code == 1 and err.count("\n") == 1 and f"{bad}:1:" in err
    code, _, err = run("suppress", "import", str(tmp_path / "missing.csv"))
    assert code == 1 and err.count("\n") == 1 and "missing.csv" in err


def test_queue_list_shows_attempts_out_of_the_limit_and_when_each_message_expires(run):
    spool = Spool(run.state / "spool")
    arrival = 1_800_000_000.0
    for sender in ("alice@example.test", "offers@news.example.test"):
        envelope = Envelope(new_queue_id(), sender, [Recipient("bob@gmail.com", DEFERRED, 3)], arrival, arrival + 60)
        spool.store(envelope, [b"Subject: x\n\nhi\n"])
    code, out, _ = run("queue", "list")
    assert code == 0 and out.count("3/8 attempts") == 2
    assert "<alice@example.test>  next 2027-01-15T08:01:00Z  expires 2027-01-20T08:00:00Z" in out
    assert "<offers@news.example.test>  next 2027-01-15T08:01:00Z  expires 2027-01-16T08:00:00Z" in out
    code, out, _ = run("queue", "list", "--json")
    messages = {m["sender"]: m for m in json.loads(out)["messages"]}
    assert messages["offers@news.example.test"]["expires"] == "2027-01-16T08:00:00Z"
    assert messages["alice@example.test"]["max_attempts"] == 8
