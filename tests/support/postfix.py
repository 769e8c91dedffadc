"""A private Postfix instance on loopback, for end-to-end tests and benchmarks.

    pf = Postfix(tmp / "postfix", listen="127.0.0.10:2525", mailboxes=["user@pfx.test"])
    with pf:                                  # configure + start; stop on exit
        ...                                   # mail to user@pfx.test lands in pf.maildir("user@pfx.test")

Everything lives under `root`: `etc/` (main.cf, master.cf, the mailbox map),
`queue/`, `data/`, `vmail/` (the Maildirs) and `maillog`. It is driven only
with `postfix -c ROOT/etc ...` (and postconf/postsuper/postqueue with the same
-c), so the system Postfix, if any, is never touched. Only the standard library
is used, so the benchmarks can import this too.

Needs root (Postfix's master runs as root and its daemons drop to `postfix`)
and Debian's `postfix` package (`tests/ensure-peers` installs it).
`unavailable()` says why an instance cannot run here, or returns None.

Pitfalls this handles (see also bench/README.md):

* `postfix` reports errors only to a tty or syslog, and there is no /dev/log
  here: everything goes to `maillog` through postlogd, and a failed command's
  exception carries the log's tail.
* `maillog_file` must lie under `maillog_file_prefixes`, set to `root`.
* Debian's stock master.cf chroots daemons into the queue directory; this one
  chroots nothing (except the smtp client when `resolver` is given, see there).
* `root` and its parents must be reachable (o+x) by the `postfix` user;
  `data_directory` belongs to `postfix`; `postfix check` creates the queue's
  subdirectories with the right owners.
* Virtual mailbox domains must not be in `mydestination`; the map is
  `texthash:` (no postmap), and a trailing `/` in it selects Maildir.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

MAIL_OWNER = "postfix"  # Postfix drops privileges to this account
VMAIL_USER = "nobody"  # virtual(8) stores mail as this (virtual_minimum_uid is 100)

# Only the services a loopback-only instance uses. {smtp_chroot} is "n" unless
# the smtp client must read its own resolv.conf (see Postfix.resolver).
MASTER_CF = """\
{smtpd}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       {smtp_chroot}       -       -       smtp
relay     unix  -       -       {smtp_chroot}       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """A postfix command failed; the message carries its output and the maillog tail."""


def unavailable() -> str | None:
    """Why a private Postfix cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "a private Postfix needs root (its master runs as root)"
    for tool in ("postfix", "postconf", "postsuper", "postqueue"):
        if shutil.which(tool) is None:
            return f"{tool} not found: run tests/ensure-peers (installs Debian's postfix)"
    try:
        pwd.getpwnam(MAIL_OWNER)
        pwd.getpwnam(VMAIL_USER)
    except KeyError as e:
        return f"no such user {e}: is Debian's postfix package installed?"
    return None


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _loopback(address: str) -> str:
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"{address} is not a loopback address: a test Postfix listens on loopback only")
    return address


def _make_reachable(path: Path) -> None:
    """Give o+x on `path` and its parents, so the `postfix` user can walk down to it."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


class Postfix:
    """One private Postfix instance rooted at `root` (created if missing).

    listen:    "ADDR:PORT" for smtpd (ADDR must be loopback; PORT 0 picks a free
               one), or None for no SMTP listener.
    mailboxes: addresses delivered by virtual(8) into Maildirs under root/vmail;
               their domains become virtual_mailbox_domains.
    tls:       (cert, key) paths: smtpd offers STARTTLS (security level "may")
               and records the TLS protocol and cipher in its Received header.
    resolver:  a loopback address with a DNS server on port 53. The smtp client
               then runs chrooted in the queue directory and reads
               queue/etc/resolv.conf naming it (the libc resolver cannot be given
               a port, and the system's /etc/resolv.conf is not ours to change).
    settings:  extra main.cf lines ("name = value"), applied last.
    """

    def __init__(self, root: Path, *, listen: str | None = None, mailboxes: Iterable[str] = (),
                 hostname: str = "mx.postfix.test", tls: tuple[Path, Path] | None = None,
                 resolver: str | None = None, settings: Sequence[str] = ()) -> None:
        self.root = Path(root).resolve()
        self.etc = self.root / "etc"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.vmail = self.root / "vmail"
        self.log_file = self.root / "maillog"
        self.address: str | None = None
        self.port: int | None = None
        if listen is not None:
            host, _, port = listen.rpartition(":")
            self.address = _loopback(host.strip("[]"))
            self.port = int(port) or free_port(self.address)
        self.mailboxes = [m.lower() for m in mailboxes]
        self.hostname = hostname
        self.tls = tls
        self.resolver = _loopback(resolver) if resolver else None
        self.settings = list(settings)
        self.master_pid: int | None = None
        self._configured = False

    # --- commands ---------------------------------------------------------------

    def _run(self, cmd: list[str], check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise PostfixError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                               f"maillog:\n{tail(self.log_file)}")
        return proc

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`postfix -c ROOT/etc ARGS` (start, stop, reload, flush, check...)."""
        return self._run(["postfix", "-c", str(self.etc), *args], check=check)

    def postconf(self, *settings: str) -> None:
        """Edit this instance's main.cf ("name = value" each); `reload()` to apply while running."""
        if settings:
            self._run(["postconf", "-c", str(self.etc), "-e", *settings])

    def postsuper(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["postsuper", "-c", str(self.etc), *args])

    def postqueue(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self._run(["postqueue", "-c", str(self.etc), *args], timeout=timeout)

    def reload(self) -> None:
        self.postfix("reload")

    # --- set-up -----------------------------------------------------------------

    def maildir(self, address: str) -> Path:
        """The Maildir that `address` (one of `mailboxes`) is delivered to."""
        local, _, domain = address.lower().rpartition("@")
        return self.vmail / domain / local

    def main_cf(self) -> list[str]:
        vuser = pwd.getpwnam(VMAIL_USER)
        domains = sorted({m.rpartition("@")[2] for m in self.mailboxes})
        settings = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            f"mail_owner = {MAIL_OWNER}",
            "setgid_group = postdrop",
            # Never anything but loopback, and never the system's own names.
            # inet_interfaces must name an interface's own address (127.0.0.10 is
            # not one, though it binds): smtpd's own address is in master.cf.
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            f"myhostname = {self.hostname}",
            f"mydomain = {self.hostname.partition('.')[2] or 'postfix.test'}",
            "myorigin = $myhostname",
            # Virtual mailbox domains must NOT also be in mydestination.
            "mydestination = localhost",
            "relay_domains =",
            "relayhost =",
            "alias_maps =",
            "alias_database =",
            f"virtual_mailbox_domains = {' '.join(domains)}",
            f"virtual_mailbox_base = {self.vmail}",
            f"virtual_mailbox_maps = texthash:{self.etc}/vmailbox",
            f"virtual_uid_maps = static:{vuser.pw_uid}",
            f"virtual_gid_maps = static:{vuser.pw_gid}",
            # No syslog here: a file through postlogd, under maillog_file_prefixes.
            f"maillog_file_prefixes = {self.root}",
            f"maillog_file = {self.log_file}",
            "biff = no",
            "smtpd_banner = $myhostname ESMTP",
        ]
        if self.tls:
            cert, key = self.tls
            settings += [
                f"smtpd_tls_cert_file = {Path(cert).resolve()}",
                f"smtpd_tls_key_file = {Path(key).resolve()}",
                "smtpd_tls_security_level = may",
                "smtpd_tls_received_header = yes",
                "smtpd_tls_loglevel = 1",
            ]
        return settings + self.settings

    def configure(self) -> None:
        """Write etc/, create the folders; safe to call once before start()."""
        owner = pwd.getpwnam(MAIL_OWNER)
        vuser = pwd.getpwnam(VMAIL_USER)
        for folder in (self.etc, self.queue, self.data, self.vmail):
            folder.mkdir(parents=True, exist_ok=True)
        _make_reachable(self.root)
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        lines = []
        for address in self.mailboxes:
            maildir = self.maildir(address)
            for sub in ("tmp", "new", "cur"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
            for folder in (maildir.parent, maildir, *(maildir / s for s in ("tmp", "new", "cur"))):
                os.chown(folder, vuser.pw_uid, vuser.pw_gid)
            lines.append(f"{address} {maildir.relative_to(self.vmail)}/\n")
        (self.etc / "vmailbox").write_text("".join(lines))
        smtpd = ""
        if self.address is not None:
            smtpd = f"{self.address}:{self.port}  inet  n       -       n       -       -       smtpd\n"
        chroot = "n"
        if self.resolver:
            chroot = "y"
            (self.queue / "etc").mkdir(exist_ok=True)
            (self.queue / "etc" / "resolv.conf").write_text(f"nameserver {self.resolver}\noptions attempts:1 timeout:2\n")
            # The chrooted client still needs the time zone to log and nothing else
            # (numeric ports, addresses from DNS).
            if Path("/etc/localtime").exists():
                shutil.copy("/etc/localtime", self.queue / "etc" / "localtime")
        (self.etc / "master.cf").write_text(MASTER_CF.format(smtpd=smtpd, smtp_chroot=chroot))
        (self.etc / "main.cf").write_text("")
        self.postconf(*self.main_cf())
        self._configured = True

    # --- running ----------------------------------------------------------------

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 30) -> Postfix:
        if not self._configured:
            self.configure()
        # `check` creates the queue subdirectories and fixes their ownership.
        self.postfix("check")
        self.postfix("start")
        deadline = time.monotonic() + timeout
        while self.master_pid is None and time.monotonic() < deadline:
            self.master_pid = self._read_master_pid()
            if self.master_pid is None:
                time.sleep(0.05)
        if self.master_pid is None:
            self.stop()
            raise PostfixError(f"postfix master did not write its pid file\nmaillog:\n{tail(self.log_file)}")
        if self.address is not None:
            try:
                self._wait_for_smtpd(deadline)
            except Exception:
                self.stop()
                raise
        return self

    def _wait_for_smtpd(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.master_pid is not None and not pid_alive(self.master_pid):
                raise PostfixError(f"postfix master exited during start\nmaillog:\n{tail(self.log_file)}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise PostfixError(f"nothing listens on {self.address}:{self.port}\nmaillog:\n{tail(self.log_file)}")

    def stop(self, timeout: float = 15) -> None:
        """`postfix -c ROOT/etc stop`; SIGKILL to this instance's master only if it lingers."""
        if not self._configured:
            return
        pid = self.master_pid or self._read_master_pid()
        self.postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while pid and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.master_pid = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
