"""Logs answer "what happened to the mail for bob@x?"."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.e2e.conftest import TWISTD, free_port, wait_for_port
from tests.e2e.test_sending import dns, relay_config, sinks, smarthost_config, submit, wait_for  # noqa: F401  (fixtures)
from tests.support.peers import make_ca_and_cert


@pytest.fixture
def request_cleanup():
    undo: list = []
    yield undo
    for step in reversed(undo):
        step()


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
    # The sink offers no STARTTLS: the lines say the mail went in the clear.
    assert [line.split(" tls=")[1].split()[0] for line in life if " status=" in line] == ["none", "none"]
    for line in life:
        assert f"{queue_id}: " in line


def status_lines(daemon, queue_id: str) -> list[str]:
    return [line.split(f"{queue_id}: ", 1)[1] for line in daemon.log().splitlines()
            if f"{queue_id}: to=<" in line and " status=" in line]


def test_smart_host_deferrals_are_logged_with_tls_and_the_operators_hold_and_release(make_daemon, dns, sinks, tmp_path):  # noqa: F811
    """Primary smart host down, the backup (over TLS) says 451 once: each attempt's outcome has
    its status= line, as for an MX, and every line says whether TLS carried the mail."""
    ca, cert, key = make_ca_and_cert(tmp_path / "pki", "smtp2.provider.test")
    backup = sinks("127.0.0.9", port=0, tls_cert=cert, tls_key=key,
                   script=[{"when": "RCPT", "reply": "451 4.3.0 try again", "times": 1}])
    down = free_port("127.0.0.8")
    daemon = make_daemon(extra=smarthost_config(
        dns,
        f'host = "smtp1.provider.test"\nport = {down}\ntls = "none"',
        f'host = "smtp2.provider.test"\nport = {backup.port}\ntls = "starttls"\nca_file = "{ca}"',
    ).replace('retry = ["1s"]', 'retry = ["1h"]'))
    submit(daemon, ["bob@remote.test"], "through the backup")
    queue_id = re.search(r"(\w{16}): accepted client=", daemon.log()).group(1)
    [deferred] = wait_for(lambda: status_lines(daemon, queue_id), what="the deferral logged")
    assert re.fullmatch(r"to=<bob@remote\.test> relay=smtp2\.provider\.test\[127\.0\.0\.9\]:\d+ tls=TLSv1\.[23] "
                        r"delay=\d+\.\d\d dsn=4\.3\.0 status=deferred \(451 4\.3\.0 try again\)", deferred), deferred
    assert f"{queue_id}: smtp1.provider.test[127.0.0.8]:{down}: connect to " in daemon.log()

    daemon.cli("queue", "hold", queue_id)
    wait_for(lambda: f"{queue_id}: held by the operator" in daemon.log(), what="the hold logged")
    daemon.cli("queue", "release", queue_id)
    wait_for(lambda: f"{queue_id}: released by the operator" in daemon.log(), what="the release logged")
    daemon.cli("queue", "flush", queue_id)
    wait_for(backup.messages, what="delivery through the backup")
    delivered = wait_for(lambda: status_lines(daemon, queue_id)[1:], what="the delivery logged")
    assert re.match(r"to=<bob@remote\.test> relay=smtp2\.provider\.test\[127\.0\.0\.9\]:\d+ tls=TLSv1\.[23] .* "
                    r"status=delivered \(250 ", delivered[0]), delivered


def test_an_unreachable_only_smart_host_logs_a_deferral_for_each_attempt(make_daemon, dns):  # noqa: F811
    down = free_port("127.0.0.8")
    daemon = make_daemon(extra=smarthost_config(dns, f'host = "smtp1.provider.test"\nport = {down}\ntls = "none"'))
    submit(daemon, ["bob@remote.test", "carl@remote.test"], "nowhere to go")
    queue_id = re.search(r"(\w{16}): accepted client=", daemon.log()).group(1)
    lines = wait_for(lambda: status_lines(daemon, queue_id) if len(status_lines(daemon, queue_id)) >= 4 else None,
                     what="two attempts logged")
    for rcpt, line in zip(["bob", "carl"] * 2, lines):
        assert line.startswith(f"to=<{rcpt}@remote.test> relay=smtp1.provider.test[127.0.0.8]:{down} tls=none "), line
        assert " dsn=4.4.1 status=deferred (connect to smtp1.provider.test[127.0.0.8]:" in line, line


def test_json_lines_logger(make_daemon):
    daemon = make_daemon(start=False)
    with open(daemon.root / "json.log", "wb") as out:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logger=mailhost.ops.logs.json_lines", "mailhost",
                                    "--config", str(daemon.config)], cwd=daemon.root, stdout=out, stderr=subprocess.STDOUT)
    daemon.process = process
    wait_for_port(daemon.port, process)
    submit(daemon, ["alice@example.test"], "json")
    daemon.stop()
    events = [json.loads(line) for line in (daemon.root / "json.log").read_text().splitlines() if line.strip()]
    accepted = [e for e in events if e.get("log_namespace") == "mailhost.smtp" and "accepted" in e.get("log_format", "")]
    assert accepted and accepted[0]["sender"] == "alice@example.test"


def test_json_lines_logger_with_a_worker(make_daemon):
    """With --logger, a worker's events reach the main process as JSON and are logged its way, marked."""
    daemon = make_daemon(start=False, workers=2)
    with open(daemon.root / "json.log", "wb") as out:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logger=mailhost.ops.logs.json_lines", "mailhost",
                                    "--config", str(daemon.config)], cwd=daemon.root, stdout=out, stderr=subprocess.STDOUT)
    daemon.process = process
    wait_for_port(daemon.port, process)

    def events() -> list[dict]:
        text = (daemon.root / "json.log").read_text()
        return [json.loads(line.lstrip("\x1e")) for line in text.splitlines() if line.strip().lstrip("\x1e")]

    deadline = time.monotonic() + 30
    while not any(e.get("log_worker") == 1 and "listening" in e.get("log_format", "") for e in events()):
        assert time.monotonic() < deadline, "no JSON event from worker 1"
        time.sleep(0.1)
    daemon.stop()
    [listening] = [e for e in events() if e.get("log_worker") == 1 and "listening" in e.get("log_format", "")]
    assert listening["number"] == 1 and "worker 1" in listening["log_system"]


def test_world_writable_spool_or_users_file_refused(make_daemon):
    import os

    daemon = make_daemon(start=False)
    spool = daemon.root / "state" / "spool"
    spool.mkdir(parents=True)
    os.chmod(spool, 0o777)
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhost", "--config", str(daemon.config)],
                            cwd=daemon.root, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "world-writable" in result.stderr and str(spool) in result.stderr and "Traceback" not in result.stderr
    os.chmod(spool, 0o700)
    os.chmod(daemon.root / "users", 0o666)
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhost", "--config", str(daemon.config)],
                            cwd=daemon.root, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "users is world-writable" in result.stderr


def test_started_as_root_binds_then_runs_unprivileged(request_cleanup):
    import os

    from tests.e2e.conftest import wait_for_port

    if os.getuid() != 0:
        pytest.skip("needs root, as a real deployment on port 25 does")
    import shutil
    import tempfile
    from pathlib import Path

    from tests.e2e.conftest import Daemon

    root = Path(tempfile.mkdtemp(prefix="mailhost-priv-"))  # pytest's own folders are closed to other users
    request_cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    daemon = Daemon(root)
    daemon.seed_users(["alice@example.test"])
    request_cleanup.append(daemon.stop)
    text = daemon.config.read_text().replace(f"tcp:{daemon.port}:interface=127.0.0.1", "tcp:587:interface=127.0.0.13")
    daemon.config.write_text(text)
    (daemon.root / "state").mkdir(mode=0o700)
    for path in (daemon.root, daemon.root / "state", daemon.root / "users"):
        os.chown(path, 65534, 65534)
    with open(daemon.log_path, "ab") as out:
        daemon.process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--uid=65534", "--gid=65534", "mailhost",
                                           "--config", str(daemon.config)], cwd=daemon.root, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(587, daemon.process, host="127.0.0.13")
    # twistd binds first, then switches: wait for the switch.
    wait_for(lambda: "Uid:\t65534\t65534\t65534\t65534" in open(f"/proc/{daemon.process.pid}/status").read(),
             what="the switch to uid 65534")
    import smtplib

    with smtplib.SMTP("127.0.0.13", 587, timeout=10) as client:
        client.sendmail("s@client.test", ["alice@example.test"], b"Subject: unprivileged\r\n\r\nx\r\n")
    [path] = (daemon.root / "mail/example.test/alice/new").iterdir()
    assert path.stat().st_uid == 65534


def test_sighup_reloads_aliases_and_a_broken_config_keeps_the_running_one(daemon):
    import signal
    import smtplib

    def rcpt(address: str) -> int:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.ehlo()
            client.mail("s@client.test")
            return client.rcpt(address)[0]

    assert rcpt("newsletter@example.test") == 550
    good = daemon.config.read_text().replace("[domain.aliases]\n", '[domain.aliases]\nnewsletter = ["bob"]\n', 1)
    daemon.config.write_text(good)
    daemon.process.send_signal(signal.SIGHUP)
    from tests.e2e.test_sending import wait_for

    wait_for(lambda: "reloaded " in daemon.log(), what="the reload")
    assert rcpt("newsletter@example.test") == 250
    daemon.config.write_text(good + "\n[bogus]\nkey = 1\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in daemon.log(), what="the refused reload")
    assert "bogus" in daemon.log()
    assert rcpt("newsletter@example.test") == 250  # still serving, with the last good configuration
    assert daemon.process.poll() is None
    # A new number of workers needs a restart (the queue's shards follow the starting count): say so.
    daemon.config.write_text(good.replace("workers = 1", "workers = 3", 1))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "server.workers changed; those take effect at the next restart" in daemon.log(),
             what="the warning about server.workers")
