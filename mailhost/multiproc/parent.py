"""`[server] workers = N` ("auto": one per usable core): more reactor processes sharing the listening sockets.

The main process (twistd) binds the listeners as always. Once its queue is
loaded (so that its start-up clean-up of the spool cannot meet a worker's write
in progress), it starts N - 1 worker processes, `python -m mailhost.multiproc.child`,
each inheriting the listening sockets and one end of a private socket pair as
file descriptors. Every process accepts on the same sockets, one connection per
wake-up (mailhost.multiproc.accept), so that connections arriving together spread
over the processes. A worker serves its sessions with its own
SMTPServerFactory, writes Maildir copies and spool entries itself through
Intake (the same fsyncs before the same 250), and delivers its own shard of the
queue (mailhost.multiproc.shard): the messages it accepted, whose ids it picks in its
shard, and those of its shard already in the spool, which it loads at start.
Each process keeps 1/N of queue.concurrency and of every destination's pace.

The socket pair speaks AMP, main -> worker, with the commands of mailhost.multiproc.commands:

    WorkerStart    the TLS pair in use; the worker then starts listening
    WorkerReload   after SIGHUP: the users files and the (new) TLS pair
    QueueCommand   `mailhost queue ...` for a message of its shard (the control socket's command)
    PaceCommand    its share of each paced group, for `queue list` (the control socket's command)

The TLS pair travels this way because a worker starts after twistd's --uid
switch and may not read a key file only root can (the main process read it
before the switch). When the main process writes twistd's text lines to stdout
itself (mailhost.ops.logs.default_observer), a worker inherits that stdout and
writes its own text lines there; otherwise (--logfile, --logger) it writes its
log events as JSON lines to a pipe the main process reads and hands to its own
log observer. Either way there is one log, in the format and place twistd was told.

A worker that exits is started again (after a second, longer if it keeps
dying) and loads its shard again; its messages wait meanwhile. When no worker
can be started at all, the main process delivers every shard. Stopping the main process stops the workers
(SIGTERM to each, by pid); a worker whose socket pair closes (the main process
died) stops by itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mailhost
from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp

from mailhost.multiproc.loads import SessionLoads
from mailhost.multiproc.shard import Shard, shard_of
from mailhost.multiproc.commands import AMP_VALUE_MAX, PaceCommand, QueueCommand, WorkerReload, WorkerStart
from mailhost.multiproc.lookups import MainChannel
from mailhost.queue.operations import PaceReport, QueueOperations
from mailhost.queue.spool import SpoolError
from mailhost.ops.logs import worker_system
from mailhost.delivery.routing import Router
from mailhost.delivery.throttle import merge_snapshots

log = Logger(namespace="mailhost.workers")

# The endpoint kinds whose listening socket a worker can adopt and serve as the main process does.
SHAREABLE_ENDPOINTS = ("tcp", "tcp6", "unix")
# Restarting a worker that keeps dying: wait this long, doubling up to the most.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 10.0  # a worker that ran this long starts over with the shortest wait
STOP_TIMEOUT = 10.0  # after SIGTERM, then SIGKILL


def shareable(endpoint: str) -> bool:
    return endpoint.split(":", 1)[0] in SHAREABLE_ENDPOINTS


def check_pem_size(pem: tuple[bytes, bytes]) -> None:
    for part in pem:
        if len(part) > AMP_VALUE_MAX:
            raise ValueError(f"a TLS file of {len(part)} bytes is too big to hand to the workers (at most {AMP_VALUE_MAX})")


# --- the main process's side -----------------------------------------------------------


class WorkerPool(service.Service):
    """Starts, restarts and stops the worker processes of the main process.

    `ports` are (index in config.listeners, listening port) for the listeners
    to share; `ready` fires once the queue is loaded; `strays` schedules what
    the spool holds of the main process's shard that its queue does not know,
    after a worker ended; `alone` makes the main process deliver every shard
    when no worker can run.
    """

    def __init__(self, config: Any, ports: Callable[[], list[tuple[int, Any]]], tls: Any,
                 ready: Deferred, strays: Callable[[], Deferred], reactor: Any, loads: SessionLoads, router: Router,
                 alone: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.router = router  # ours, which answers the workers' routes and DNS lookups (mailhost.multiproc.lookups)
        self.loads = loads  # every process's open sessions: each worker gets the descriptor, we clear its slot when it ends
        self._alone = alone  # no worker can run: the main process takes over their shards
        # Set when the main process writes twistd's text lines to stdout itself (mailhost.ops.logs):
        # then workers write theirs there too, instead of sending JSON lines over a pipe.
        self.share_stdout = False
        self.count = config.server.workers - 1
        self._ports = ports
        self.tls = tls
        self._ready = ready
        self._strays = strays
        self.reactor = reactor
        self.workers: dict[int, _Worker] = {}  # by number, 1 .. count
        self._restarts: dict[int, Any] = {}  # number -> pending callLater
        self._delays: dict[int, float] = {}
        self._shared: list[tuple[int, int]] = []  # (listener index, fd in this process)

    def startService(self) -> None:
        super().startService()
        self._ready.addCallback(self._when_ready)

    def _when_ready(self, result: object) -> object:
        # Others wait on the same Deferred: keep its result, and keep our failures to ourselves.
        try:
            started = self._start_all()
        except Exception:
            log.failure("cannot start the workers")
            started = False
        if not started and self.running:
            log.warn("the main process delivers the whole queue")
            self._alone()
        return result

    def _start_all(self) -> bool:
        """Start every worker; False when none can run."""
        if not self.running:
            return True
        for index, port in self._ports():
            endpoint = self.config.listeners[index].endpoint
            if not shareable(endpoint) or not hasattr(port, "fileno"):
                log.info("listener {endpoint} stays with the main process (workers share tcp, tcp6 and unix listeners)",
                         endpoint=endpoint)
                continue
            self._shared.append((index, port.fileno()))
        if not self._shared:
            log.warn("server.workers = {n}, but no listener can be shared; no workers started", n=self.count + 1)
            return False
        try:
            check_pem_size(self.tls.pem)
        except ValueError as e:
            log.error("no workers started: {error}", error=str(e))
            return False
        # A worker reads these itself, as the daemon's user (the main process read them before --uid).
        for path in [self.config.path, *(entry.key_file for entry in getattr(self.config, "dkim", ()))]:
            if not os.access(path, os.R_OK):
                log.error("no workers started: they cannot read {path} (the daemon's user must be able to)",
                          path=str(path))
                return False
        for number in range(1, self.count + 1):
            self._spawn(number)
        return True

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        try:
            self._start_worker(number)
        except Exception:
            log.failure("worker {number} could not be started", number=number)
            self._restart_later(number, lived=0.0)

    def _start_worker(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Text lines to stdout: the worker writes its own into it; else JSON lines to us.
            child_fds: dict[int, Any] = {0: "w", 1: 1 if self.share_stdout else "r", 2: 2, 3: theirs.fileno()}
            fds = []
            for child_fd, (index, fd) in enumerate(self._shared, start=4):
                child_fds[child_fd] = fd
                # The role, not the index: the config file may have changed since we read it.
                fds.append(f"{self.config.listeners[index].role}:{child_fd}")
            args = [sys.executable, "-m", "mailhost.multiproc.child", "--config", str(self.config.path),
                    "--number", str(number), "--shards", str(self.count + 1), "--channel", "3", "--fds", ",".join(fds),
                    "--log", "text" if self.share_stdout else "json"]
            loads_fd = 4 + len(self._shared)
            child_fds[loads_fd] = self.loads.fileno()
            args += ["--loads", str(loads_fd)]
            worker = _Worker(self, number)
            self.reactor.spawnProcess(worker, sys.executable, args, env=_environment(), childFDs=child_fds)
            worker.pid = worker.transport.pid
            worker.transport.closeChildFD(0)  # its stdin: nothing to read
            worker.channel = MainChannel(self.router)  # we ask (WorkerStart, ...); it asks us its lookups
            factory = protocol.Factory.forProtocol(lambda: worker.channel)
            factory.noisy = False
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        finally:
            ours.close()
            theirs.close()
        self.workers[number] = worker
        log.info("worker {number} started: pid {pid}", number=number, pid=worker.pid)
        worker.channel.callRemote(WorkerStart, cert_pem=self.tls.pem[0], key_pem=self.tls.pem[1]).addErrback(
            lambda failure: log.error("worker {number} did not start: {error}", number=number,
                                      error=failure.getErrorMessage()))

    def _ended(self, worker: _Worker, reason: Any) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
            self.loads.mark_absent(worker.number)  # nobody leaves connections to it meanwhile
        if worker.stopped is not None:
            worker.stopped.callback(None)
        if not self.running:
            return
        delay = self._restart_later(worker.number, lived=time.monotonic() - worker.started)
        log.warn("worker {number} (pid {pid}) ended: {reason}; starting it again in {delay:g}s",
                 number=worker.number, pid=worker.pid, reason=reason.getErrorMessage(), delay=delay)
        # The restarted worker loads its own shard; look for anything of ours the queue does not know.
        self._strays().addErrback(lambda failure: log.failure("looking for unreported messages", failure))

    def _restart_later(self, number: int, lived: float) -> float:
        previous = self._delays.get(number, RESTART_DELAY / 2)
        delay = RESTART_DELAY if lived >= STABLE_SECONDS else min(previous * 2, RESTART_DELAY_MAX)
        self._delays[number] = delay
        self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)
        return delay

    def reload(self) -> None:
        """After SIGHUP: each worker reloads as the main process did, with the main process's TLS pair."""
        try:
            check_pem_size(self.tls.pem)
        except ValueError as e:
            log.error("reload: workers keep their TLS pair: {error}", error=str(e))
            return
        for worker in list(self.workers.values()):
            worker.channel.callRemote(WorkerReload, cert_pem=self.tls.pem[0], key_pem=self.tls.pem[1]).addErrback(
                lambda failure, n=worker.number: log.error("worker {number}: reload failed: {error}", number=n,
                                                           error=failure.getErrorMessage()))

    def stopService(self) -> Deferred:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = [worker.stop(self.reactor) for worker in list(self.workers.values())]
        return DeferredList(waits) if waits else succeed(None)


class ShardedQueue:
    """The queue as `mailhost queue` and `queue list`'s paces see it when every
    process delivers its own shard: each command goes to the process holding
    the message (a flush of everything to all of them), paces are added up.
    QueueOperations and PaceReport (mailhost.queue.operations) over this
    process's Scheduler and Throttle and the workers' channels."""

    def __init__(self, scheduler: QueueOperations, throttle: PaceReport, pool: WorkerPool,
                 shard: Callable[[], Shard]) -> None:
        self.scheduler = scheduler  # this process's shard
        self.throttle = throttle
        self.pool = pool
        self._shard = shard  # this process's Shard now (all of them once no worker can run)

    def flush(self, queue_id: str | None = None) -> Deferred[int]:
        if queue_id is not None:
            return self._on_owner(queue_id, "flush", lambda: self.scheduler.flush(queue_id))
        # A worker starting again loads its shard from the spool, due times and all; nothing to tell it.
        calls = [maybeDeferred(self.scheduler.flush, None)] + [
            channel.callRemote(QueueCommand, action="flush").addCallback(lambda answer: answer["count"])
            for channel in self._channels()]
        return DeferredList(calls, consumeErrors=True).addCallback(
            lambda results: sum(count for ok, count in results if ok))

    def set_held(self, queue_id: str, held: bool) -> Deferred:
        return self._on_owner(queue_id, "hold" if held else "release", lambda: self.scheduler.set_held(queue_id, held))

    def delete(self, queue_id: str) -> Deferred:
        return self._on_owner(queue_id, "delete", lambda: self.scheduler.delete(queue_id))

    def snapshot(self) -> Deferred[dict]:
        calls = [maybeDeferred(self.throttle.snapshot)] + [
            channel.callRemote(PaceCommand).addCallback(lambda answer: json.loads(answer["json"]))
            for channel in self._channels()]
        return DeferredList(calls, consumeErrors=True).addCallback(
            lambda results: merge_snapshots([paces for ok, paces in results if ok]))

    def _channels(self) -> list[amp.AMP]:
        return [w.channel for w in self.pool.workers.values() if w.channel is not None and w.channel.transport is not None]

    def _on_owner(self, queue_id: str, action: str, here: Callable[[], Any]) -> Deferred:
        owner = shard_of(queue_id, self._shard().count)
        if owner == 0:
            return maybeDeferred(here)
        worker = self.pool.workers.get(owner)
        if worker is None or worker.channel is None or worker.channel.transport is None:
            return fail(SpoolError(f"{queue_id} belongs to worker {owner}, which is starting again; try again shortly"))
        return worker.channel.callRemote(QueueCommand, action=action, queue_id=queue_id).addCallback(
            lambda answer: answer["count"])


def _environment() -> dict[str, str]:
    """Ours; with a source checkout's folder first on the path, so the worker runs the code we run."""
    env = dict(os.environ)
    source = Path(mailhost.__file__).resolve().parent.parent
    if source.name not in ("site-packages", "dist-packages"):  # an installed package is found anyway
        env["PYTHONPATH"] = os.pathsep.join([str(source), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


class _Worker(protocol.ProcessProtocol):
    """One worker process, seen from the main process: its exit, and its log lines on the pipe."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.started = time.monotonic()
        self.pid = 0
        self.channel: amp.AMP | None = None
        self.stopped: Deferred | None = None
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._log_line(line)

    def _log_line(self, line: bytes) -> None:
        text = line.lstrip(b"\x1e").decode("utf-8", "replace")
        if not text.strip():
            return
        try:
            event = eventFromJSON(text)
            if not isinstance(event, dict) or "log_time" not in event:
                raise ValueError(text)
        except ValueError:
            # Not a log event (something printed outside the logger): keep it, as text.
            log.info("worker {number}: {line}", number=self.number, line=text)
            return
        event["log_worker"] = self.number
        event["log_system"] = worker_system(event, self.number)  # twistd's text lines show it
        globalLogPublisher(event)

    def processEnded(self, reason: Any) -> None:
        if self._partial:
            self._log_line(self._partial)
            self._partial = b""
        self.pool._ended(self, reason)

    def stop(self, reactor: Any) -> Deferred:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; fires once it has exited."""
        self.stopped = Deferred()
        try:
            self.transport.signalProcess("TERM")
        except Exception:  # already gone; processEnded is on its way
            pass
        kill = reactor.callLater(STOP_TIMEOUT, self._kill)
        self.stopped.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])
        return self.stopped

    def _kill(self) -> None:
        log.warn("worker {number} (pid {pid}) ignored SIGTERM for {timeout:g}s; killing it", number=self.number,
                 pid=self.pid, timeout=STOP_TIMEOUT)
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass
