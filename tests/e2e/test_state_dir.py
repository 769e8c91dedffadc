"""One daemon per state_dir, and a state_dir the CLI (run as root) leaves usable by the daemon's user."""

from __future__ import annotations

import os
import signal
import subprocess

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
