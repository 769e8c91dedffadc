"""The control socket: `mailhost queue flush|delete|hold|release` (and
`mailhost sendmail`'s "pickup" poke) reach the running daemon over AMP on a
UNIX socket in state_dir, so its in-memory queue index stays right. With no
daemon listening, the CLI edits the spool itself."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from twisted.application import internet
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from mailhost.multiproc.commands import PaceCommand, QueueCommand
from mailhost.ops.ownership import Owner, give
from mailhost.queue.operations import PaceReport, QueueOperations, apply_queue_action
from mailhost.queue.spool import SpoolError, is_queue_id

log = Logger(namespace="mailhost.control")

SOCKET_NAME = "control.sock"


class ControlProtocol(amp.AMP):
    """The daemon's end of the control socket: `queue` is the Scheduler, or with workers the
    main process's ShardedQueue; `paces` the Throttle, or the ShardedQueue again."""

    def __init__(self, queue: QueueOperations, pickup: Any, paces: PaceReport) -> None:
        super().__init__()
        self.queue = queue
        self.pickup = pickup
        self.paces = paces

    @PaceCommand.responder
    def pace(self) -> Deferred[dict[str, str]]:
        # With server.workers, the snapshot gathers every process's paces (a Deferred).
        return maybeDeferred(self.paces.snapshot).addCallback(lambda paces: {"json": json.dumps(paces)})

    @QueueCommand.responder
    def queue_command(self, action: str, queue_id: str | None = None) -> Deferred[dict[str, int]]:
        return Deferred.fromCoroutine(self._queue_command(action, queue_id))

    async def _queue_command(self, action: str, queue_id: str | None) -> dict[str, int]:
        if queue_id is not None and not is_queue_id(queue_id):
            # Whatever is connected to the socket: an id only ever names a file in the spool.
            raise SpoolError(f"{queue_id[:40]!r} is not a queue id")
        if action == "pickup":
            log.info("control: pickup (a poke from `mailhost sendmail`)")
            self.pickup.collect()  # answered at once: sendmail need not wait for delivery
            return {"count": 1}
        return {"count": await apply_queue_action(self.queue, action, queue_id)}


class ControlServer(internet.UNIXServer):
    """The control socket's listener. The daemon binds it as root (before twistd's --uid), so
    it is given to the owner of state_dir: `mailhost queue flush` run as the daemon's user may
    connect (mode 0600: only that user and root may steer the queue)."""

    def __init__(self, path: Path, factory: Factory, owner: Owner | None) -> None:
        # No wantPID: its pid-naming lock file went stale (a reused pid kept the daemon from
        # starting); the flock on state_dir (mailhost.ops.statelock) keeps one daemon per socket.
        super().__init__(str(path), factory, mode=0o600)
        self.path = path
        self.owner = owner

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        give(self.path, self.owner)

    def startService(self) -> None:
        super().startService()
        give(self.path, self.owner)


def remove_stale_socket(state_dir: Path) -> None:
    """What a daemon that ended without cleaning up left: its socket (bind fails while it
    exists) and the PID lock of earlier versions. Call only while holding the state_dir lock:
    then no other daemon can be listening on it."""
    path = state_dir / SOCKET_NAME
    for stale in (path, path.with_name(path.name + ".lock")):
        try:
            if stat.S_ISSOCK(os.lstat(stale).st_mode) or stale.is_symlink():
                os.unlink(stale)
        except FileNotFoundError:
            pass


def control_service(state_dir: Path, queue: QueueOperations, pickup: Any, paces: PaceReport,
                    owner: Owner | None = None) -> internet.UNIXServer:
    factory = Factory.forProtocol(lambda: ControlProtocol(queue, pickup, paces))
    factory.noisy = False
    remove_stale_socket(state_dir)
    return ControlServer(state_dir / SOCKET_NAME, factory, owner)


class DaemonNotRunning(Exception):
    pass


def send_queue_command(state_dir: Path, action: str, queue_id: str | None, timeout: float = 30.0) -> int:
    """Ask the running daemon to act on the queue; DaemonNotRunning when nobody answers."""
    return _call(state_dir, QueueCommand, {"action": action, "queue_id": queue_id}, timeout)["count"]


def current_pace(state_dir: Path, timeout: float = 10.0) -> dict[str, dict[str, float]]:
    """The running daemon's destination paces; DaemonNotRunning when nobody answers."""
    return json.loads(_call(state_dir, PaceCommand, {}, timeout)["json"])


def _call(state_dir: Path, command: type[amp.Command], arguments: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One AMP call from a blocking socket (the CLI runs no reactor): one box out, one box back.
    The command's own schema (mailhost.multiproc.commands) encodes the arguments and decodes the answer."""
    path = state_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise DaemonNotRunning() from None
    try:
        sock.sendall(request(command, arguments))
        reply = _read_box(sock)
    finally:
        sock.close()
    return answer(command, reply)


def request(command: type[amp.Command], arguments: dict[str, Any]) -> bytes:
    """The bytes of one AMP request for `command` (arguments of None are left out, as AMP does)."""
    box = command.makeArguments({name: value for name, value in arguments.items() if value is not None}, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = b"1"
    return box.serialize()


def answer(command: type[amp.Command], reply: dict[bytes, bytes]) -> dict[str, Any]:
    """The decoded answer to `command`; an error answer as SpoolError (what the daemon raised), with its text."""
    if b"_error" in reply:
        raise SpoolError(reply.get(b"_error_description", b"error").decode("utf-8", "replace"))
    return command.parseResponse(reply, None)


def _read_box(sock: socket.socket) -> dict[bytes, bytes]:
    """One AMP box from a blocking socket: 2-byte length-prefixed keys and values, ended by an empty key."""
    data = b""

    def need(n: int) -> bytes:
        nonlocal data
        while len(data) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the control connection")
            data += chunk
        out, data = data[:n], data[n:]
        return out

    box: dict[bytes, bytes] = {}
    while True:
        key = need(int.from_bytes(need(2), "big"))
        if not key:
            return box
        box[key] = need(int.from_bytes(need(2), "big"))

