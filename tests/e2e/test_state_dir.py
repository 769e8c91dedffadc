"""One daemon per state_dir, and a state_dir the CLI (run as root) leaves usable by the daemon's user."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import TWISTD, free_port


def start_second(daemon) -> subprocess.CompletedProcess:
    """Another daemon on the same state_dir (its own port), as a second `systemctl start` or a
    copy-pasted unit would start it."""
    config = daemon.root / "second.toml"
    config.write_text(daemon.config.read_text().replace(f"tcp:{daemon.port}:", f"tcp:{free_port()}:")
                      .replace('state_dir = "state"', f'state_dir = "{daemon.root / "state"}"'))
    return subprocess.run([TWISTD, "-n", "--pidfile=", "mailhost", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=daemon.root)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_daemon_killed_hard_is_restarted_at_once(make_daemon):
    daemon = make_daemon()
    killed = daemon.process
    # Not reaped yet, so its pid still exists (as a zombie, or a reused pid after a reboot); it
    # leaves its control socket and any lock file behind.
    killed.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
    daemon.start()  # raises when it exits or does not listen
    killed.wait()
    result = daemon.cli("queue", "flush")
    assert "by the running daemon" in result.stdout


def test_a_lock_left_by_a_process_whose_pid_is_now_someone_elses(make_daemon):
    # After a reboot the pid in an old lock may belong to any process (here: this test's).
    daemon = make_daemon(start=False)
    (daemon.root / "state").mkdir(exist_ok=True)
    os.symlink(str(os.getpid()), daemon.root / "state" / "control.sock.lock")
    daemon.start()
    assert "by the running daemon" in daemon.cli("queue", "flush").stdout


def test_a_second_daemon_on_the_same_state_dir_says_so_in_one_line(make_daemon):
    daemon = make_daemon()
    result = start_second(daemon)
    assert_one_line(result, "another mailhost runs with state_dir", str(daemon.root / "state"),
                    f"pid {daemon.process.pid}")
    # The first one is untouched and still answers.
    assert daemon.process.poll() is None
    assert "by the running daemon" in daemon.cli("queue", "flush").stdout


NOBODY = 65534


def connects_as(uid: int, path: Path) -> bool:
    """Whether a process of `uid` may connect to the UNIX socket at `path` (a forked child:
    the daemon's user cannot run this machine's Python, which lives under /root). It starts in
    the socket's folder, so the test's own folders above need not be open to that user."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(path.parent)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path.name)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_what_the_daemon_makes_as_root_is_the_state_dir_owners(make_daemon):
    # twistd binds and makes these before --uid: the daemon's user must use them afterwards
    # (`queue flush` as that user was a PermissionError traceback; SIGHUP could not read the key).
    daemon = make_daemon(start=False)
    state = daemon.root / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    daemon.start()
    made = {name: (state / name).lstat() for name in ("control.sock", "mailhost.lock", "tls", "tls/cert.pem",
                                                     "tls/key.pem")}
    assert {name: (st.st_uid, st.st_gid) for name, st in made.items()} == dict.fromkeys(made, (NOBODY, NOBODY))
    assert stat.S_IMODE(made["tls/key.pem"].st_mode) == 0o600
    assert stat.S_IMODE(made["control.sock"].st_mode) == 0o600
    assert connects_as(NOBODY, state / "control.sock")
    assert not connects_as(NOBODY + 1, state / "control.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_a_generated_pair_an_earlier_version_left_to_root_is_given_at_start(make_daemon):
    daemon = make_daemon()
    daemon.stop()
    state = daemon.root / "state"
    os.chown(state, NOBODY, NOBODY)
    daemon.start()
    for name in ("tls", "tls/cert.pem", "tls/key.pem"):
        assert ((state / name).stat().st_uid, (state / name).stat().st_gid) == (NOBODY, NOBODY), name
