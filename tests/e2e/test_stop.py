"""Stopping: SIGTERM to the whole process group, as systemd's default KillMode=control-group sends it
(twistd and its workers at once), while the daemon is busy logging. The daemon exits, at once and
cleanly: once in about 26 stops it used to hang until SIGKILL (Twisted's SIGTERM handler logged
from inside the signal handler while the interrupted code held the log's lock), and the second
SIGTERM a worker got (the group's, then the main process's) logged a ReactorNotRunning traceback."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
import time

import pytest

from tests.e2e.test_sending import wait_for
from tests.e2e.test_workers import alive, worker_pids

STOPS = int(os.environ.get("MAILHOST_STOP_LOOPS", "3"))  # more by hand: MAILHOST_STOP_LOOPS=100


def keep_busy(port: int, stop: threading.Event) -> None:
    """Mail for a local user, over and over: every message is a few log lines in some process."""
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                while not stop.is_set():
                    client.sendmail("someone@client.test", ["alice@example.test"], b"Subject: busy\r\n\r\nHello.\r\n")
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)  # stopping, or between two sessions


@pytest.mark.parametrize("round", range(STOPS))
def test_sigterm_to_the_process_group_of_a_busy_daemon_with_workers(make_daemon, round):
    daemon = make_daemon(start=False, workers=2)
    daemon.start(preexec=os.setsid)  # a process group of its own: the daemon and its worker, nothing else
    wait_for(lambda: "worker 1 listening" in daemon.log(), timeout=30, what="the worker to listen")
    [worker] = worker_pids(daemon)
    stop = threading.Event()
    clients = [threading.Thread(target=keep_busy, args=(daemon.port, stop)) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: daemon.log().count("accepted") >= 10 * (round % 5 + 1), what="some traffic")
        os.killpg(daemon.process.pid, signal.SIGTERM)
        try:
            code = daemon.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.process.pid, signal.SIGKILL)
            daemon.process.wait()
            pytest.fail("the daemon did not exit within 30 s of SIGTERM")
    finally:
        stop.set()
        for client in clients:
            client.join()
    log = daemon.log()
    assert code == 0, log[-3000:]
    for word in ("Traceback", "ReactorNotRunning", "critical", "CRITICAL", "ignored SIGTERM"):
        assert word not in log, log[-3000:]
    assert "Received SIGTERM, shutting down." in log
    wait_for(lambda: not alive(worker), timeout=5, what="the worker gone too")
