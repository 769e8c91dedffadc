"""`[server] workers = 2`: a worker process shares the listeners, stores mail itself, and the
main process relays what it queued; a killed worker is started again."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailhost.envelope import Envelope, Recipient
from mailhost.spool import Spool, new_queue_id
from tests.e2e.conftest import free_port
from tests.support.dns import DNSServer
from tests.support.peers import Sink

MX_PORT = free_port()
ZONE = [("remote.test", "MX", "10 mx1.remote.test"), ("mx1.remote.test", "A", "127.0.0.5")]


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    mx = Sink(tmp_path / "sink", address="127.0.0.5", port=MX_PORT)
    yield mx
    mx.stop()


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_with_workers(make_daemon, dns: DNSServer, **kwargs):
    daemon = make_daemon(start=False, extra=f'nameservers = ["{dns.nameserver}"]\nmx_port = {MX_PORT}\n[queue]\nretry = ["1s"]\n',
                         **kwargs)
    daemon.config.write_text(daemon.config.read_text().replace('state_dir = "state"', 'state_dir = "state"\nworkers = 2', 1))
    daemon.start()
    wait_for(lambda: "worker 1 listening" in daemon.log(), what="the worker to listen")
    return daemon


def worker_pids(daemon) -> list[int]:
    """Every worker pid the log announced, in order."""
    return [int(pid) for pid in re.findall(r"worker 1 started: pid (\d+)", daemon.log())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the main process reaps its workers.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def send(port: int, rcpt: str, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "someone@client.test"
    message["To"] = rcpt
    message["Subject"] = subject
    message.set_content("Hello.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        assert client.send_message(message) == {}


def subjects(daemon, user: str = "alice") -> set[str]:
    return {m["Subject"] for m in daemon.messages(user)}


def writer_pids(daemon, user: str = "alice") -> dict[str, int]:
    """Subject -> the pid that wrote the copy (Maildir names are time.M<usec>P<pid>Q<n>.host)."""
    folder = daemon.root / "mail" / "example.test" / user
    return {m["Subject"]: int(re.search(r"P(\d+)Q", key).group(1)) for key, m in daemon.maildir(user).items()} \
        if folder.exists() else {}


def relayed(sink: Sink) -> set[str]:
    return {re.search(r"Subject: (.*)", m["data"]).group(1).strip() for m in sink.messages()}


@contextmanager
def main_process_stopped(daemon):
    """SIGSTOP the main process: only the worker can accept, and whatever it reports waits in the socket."""
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)


def test_workers_take_mail_over_many_connections_and_the_main_process_relays_it(make_daemon, dns, sink):
    daemon = start_with_workers(make_daemon, dns)
    [worker] = worker_pids(daemon)
    jobs = [("alice@example.test" if i % 2 else f"bob{i}@remote.test", f"many {i}") for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: send(daemon.port, *job), jobs))
    assert subjects(daemon) == {s for r, s in jobs if r.endswith("example.test")}
    wait_for(lambda: relayed(sink) == {s for r, s in jobs if r.endswith("remote.test")}, what="every remote message relayed")

    # With the main process stopped only the worker accepts: it stores and queues, and the
    # main process relays what it was told about once it runs again.
    with main_process_stopped(daemon):
        for i in range(3):
            send(daemon.port, "alice@example.test", f"worker local {i}")
            send(daemon.port, "bob@remote.test", f"worker remote {i}")
        written = writer_pids(daemon)
        assert {written[f"worker local {i}"] for i in range(3)} == {worker}
    wait_for(lambda: {f"worker remote {i}" for i in range(3)} <= relayed(sink), what="the worker's queued mail relayed")
    wait_for(lambda: daemon.cli("queue", "list", "--json").stdout.count('"id"') == 0, what="an empty queue")

    daemon.stop()
    wait_for(lambda: not alive(worker), timeout=10, what="the worker to stop with the main process")


def test_tls_and_auth_in_the_worker(make_daemon, dns, sink):
    daemon = start_with_workers(make_daemon, dns, submission=True)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    message = EmailMessage()
    message["From"] = "alice@example.test"
    message["To"] = "bob@remote.test"
    message.set_content("Hello.\n")
    with main_process_stopped(daemon):
        message["Subject"] = "submissions via worker"
        with smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=context, timeout=20) as client:
            client.login("alice@example.test", "s3cret-pass")
            assert client.send_message(message) == {}
        del message["Subject"]
        message["Subject"] = "submission via worker"
        with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=20) as client:
            client.starttls(context=context)
            client.login("alice@example.test", "s3cret-pass")
            assert client.send_message(message) == {}
    wait_for(lambda: relayed(sink) == {"submissions via worker", "submission via worker"}, what="both relayed")
    assert "tls=TLSv1.3" in daemon.log() and "user=alice@example.test" in daemon.log()

    # SIGHUP to the main process reloads the worker too (which gets the TLS pair from it).
    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_for(lambda: daemon.log().count("reloaded: TLS pair") == 2, what="main process and worker reloaded")
    with main_process_stopped(daemon):
        with smtplib.SMTP_SSL("127.0.0.1", daemon.submissions_port, context=context, timeout=20) as client:
            client.login("alice@example.test", "s3cret-pass")


def test_a_killed_worker_is_started_again_and_what_it_left_is_delivered(make_daemon, dns, sink):
    daemon = start_with_workers(make_daemon, dns)
    [first] = worker_pids(daemon)
    # A message committed to the spool that nobody reported (as if a worker died right after its fsync).
    envelope = Envelope(new_queue_id(), "someone@client.test", [Recipient("carl@remote.test")], time.time(), time.time())
    Spool(daemon.root / "state" / "spool").store(envelope, [b"Subject: left behind\n\nHello.\n"])

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(daemon)) == 2 and daemon.log().count("worker 1 listening") == 2,
             what="a new worker")
    second = worker_pids(daemon)[1]
    assert second != first and alive(second) and not alive(first)
    assert f"worker 1 (pid {first}) ended" in daemon.log()
    wait_for(lambda: "left behind" in relayed(sink), what="the unreported message relayed")

    with main_process_stopped(daemon):
        send(daemon.port, "alice@example.test", "after the restart")
    assert writer_pids(daemon)["after the restart"] == second
