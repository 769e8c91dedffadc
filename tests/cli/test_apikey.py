"""`mailhost apikey add|list|del`: the key printed once on one line, only its hash kept, the
file given to state_dir's owner when root runs the command, and one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mailhost.cli.main import main
from mailhost.doors.http.api.keys import ApiKeys
from tests.cli.test_main import CONFIG
from tests.cli.test_ownership import MAILHOST, NOBODY


@pytest.fixture
def run(tmp_path: Path, capsys):
    config = tmp_path / "mailhost.toml"
    config.write_text(CONFIG)

    def call(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    call.state = tmp_path / "state"  # type: ignore[attr-defined]
    return call


def test_add_prints_the_key_once_and_keeps_its_hash(run) -> None:
    code, out, err = run("apikey", "add", "crm", "--sender", "News@Example.test", "--sender", "@shop.example",
                         "--rate", "2")
    assert code == 0 and err == ""
    [key] = out.splitlines()
    assert key.startswith("mh_") and key not in (run.state / "apikeys.json").read_text()
    found = ApiKeys(run.state).find(key)
    assert (found.name, found.scopes, found.senders, found.rate) == ("crm", ("send",), ("news@example.test",
                                                                                         "@shop.example"), 2.0)
    code, out, _ = run("apikey", "list", "--json")
    [entry] = json.loads(out)["keys"]
    assert entry["name"] == "crm" and entry["scopes"] == ["send"] and key not in out
    code, out, _ = run("apikey", "list")
    assert out.startswith("crm  send  senders=news@example.test,@shop.example  rate=2/s") and "1 keys" in out


def test_scopes_and_the_note_for_a_key_that_may_not_send(run) -> None:
    code, out, err = run("apikey", "add", "ops", "--scope", "admin")
    assert code == 0 and "has no --sender, so it may not send mail" in err
    code, out, err = run("apikey", "add", "dash", "--scope", "read")
    assert code == 0 and err == ""
    assert [k.scopes for k in ApiKeys(run.state).keys()] == [("read",), ("admin",)]


def test_del_and_mistakes_are_one_line(run) -> None:
    run("apikey", "add", "crm", "--sender", "@example.test")
    assert run("apikey", "add", "crm")[2] == "mailhost: a key called crm exists (`mailhost apikey del crm` first)\n"
    assert run("apikey", "add", "../x")[0] == 1
    code, _, err = run("apikey", "add", "k", "--sender", "nobody")
    assert code == 1 and err.startswith("mailhost: --sender 'nobody'") and err.count("\n") == 1
    code, _, err = run("apikey", "add", "k", "--scope", "root")
    assert code == 1 and err.startswith("mailhost: --scope 'root'")
    code, _, err = run("apikey", "add", "k", "--rate", "0")
    assert code == 1 and "--rate 0" in err
    assert run("apikey", "del", "crm")[1] == "deleted key crm\n"
    assert run("apikey", "del", "crm")[2] == "mailhost: no key called 'crm' (see `mailhost apikey list`)\n"
    assert run("apikey", "list")[1] == "0 keys\n"
    (run.state / "apikeys.json").write_text("[]")
    code, _, err = run("apikey", "list")
    assert code == 1 and "not a mailhost API key file" in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_root_leaves_the_key_file_to_the_daemons_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    config = tmp_path / "mailhost.toml"
    config.write_text(CONFIG)
    done = subprocess.run([str(MAILHOST), "--config", str(config), "apikey", "add", "crm", "--sender", "@example.test"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for path in (state / "apikeys.json", state / "apikeys.json.lock"):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
