"""Logs answer "what happened to the mail for bob@x?"."""

from __future__ import annotations

import json
import re
import subprocess

from tests.e2e.conftest import TWISTD, wait_for_port
from tests.e2e.test_sending import dns, relay_config, sinks, submit, wait_for  # noqa: F401  (fixtures)


def test_every_line_of_a_message_life_carries_its_queue_id(make_daemon, dns, sinks):  # noqa: F811
    sinks("127.0.0.5", script=[{"when": "RCPT", "reply": "450 4.2.1 busy", "times": 1}])
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@remote.test"], "traced")
    wait_for(lambda: "removed (every recipient delivered" in daemon.log(), what="delivered and removed")
    log = daemon.log()
    queue_id = re.search(r"(\w{16}): accepted client=\[127\.0\.0\.1\]", log).group(1)
    life = [line for line in log.splitlines() if queue_id in line]
    assert any("status=deferred (450 4.2.1 busy)" in line for line in life)
    assert any("to=<bob@remote.test> relay=mx1.remote.test[127.0.0.5]" in line and "status=delivered" in line for line in life)
    for line in life:
        assert f"{queue_id}: " in line


def test_json_lines_logger(make_daemon):
    daemon = make_daemon(start=False)
    with open(daemon.root / "json.log", "wb") as out:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logger=mailhost.logs.json_lines", "mailhost",
                                    "--config", str(daemon.config)], cwd=daemon.root, stdout=out, stderr=subprocess.STDOUT)
    daemon.process = process
    wait_for_port(daemon.port, process)
    submit(daemon, ["alice@example.test"], "json")
    daemon.stop()
    events = [json.loads(line) for line in (daemon.root / "json.log").read_text().splitlines() if line.strip()]
    accepted = [e for e in events if e.get("log_namespace") == "mailhost.smtp" and "accepted" in e.get("log_format", "")]
    assert accepted and accepted[0]["sender"] == "alice@example.test"
