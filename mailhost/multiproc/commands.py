"""Every AMP command mailhost speaks, in one place: the control socket's and the workers'.

Who asks whom:

    command        control socket (CLI -> daemon)          socket pair (main -> worker)
    QueueCommand   `mailhost queue flush|delete|hold|      the same, for a message of the worker's
                   release`, and sendmail's "pickup" poke  shard (flush with no id: all of its shard)
    PaceCommand    the paced destination groups, for       the worker's share of each group
                   `queue list` (all processes added up)
    WorkerStart                                            the TLS pair in use; the worker then
                                                           starts listening
    WorkerReload                                           after SIGHUP: read the users files again,
                                                           take this TLS pair
    RouteLookup,                                           worker -> main: the main process's route
    RecordsLookup                                          or DNS records for a name (both ask DNS
                                                           once, not once each; mailhost.multiproc.lookups)

The control socket and the workers answer QueueCommand and PaceCommand alike, so
the main process hands a worker the very command the CLI sent it. The wire names
(the class names) are what `mailhost queue` and `mailhost sendmail` send through
mailhost.doors.control's small blocking client; renaming a class changes the wire.
"""

from __future__ import annotations

from twisted.protocols import amp

from mailhost.queue.spool import SpoolError

AMP_VALUE_MAX = 0xFFFF  # the most bytes one AMP value holds

# A command without arguments or without an answer leaves out `arguments` or `response` (both default to []).
# An error the responder raises as SpoolError reaches the caller as SpoolError, with its text.
QUEUE_ERRORS: dict[type[Exception], bytes] = {SpoolError: b"NO_SUCH_MESSAGE"}


class QueueCommand(amp.Command):
    """flush, delete, hold or release one queued message (flush with no id: every message not held),
    or "pickup" (the control socket only: collect the sendmail drop folder now); answers how many."""

    arguments = [(b"action", amp.Unicode()), (b"queue_id", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = QUEUE_ERRORS


class PaceCommand(amp.Command):
    """Each paced destination group's current and configured rate, as JSON
    (mailhost.delivery.throttle.Throttle.snapshot)."""

    response = [(b"json", amp.Unicode())]


class WorkerStart(amp.Command):
    """Main -> worker: the TLS pair; the worker adopts the listening sockets and answers."""

    arguments = [(b"cert_pem", amp.String()), (b"key_pem", amp.String())]


class WorkerReload(amp.Command):
    """Main -> worker, after SIGHUP: read the users files again and take this TLS pair."""

    arguments = [(b"cert_pem", amp.String()), (b"key_pem", amp.String())]


class RouteLookup(amp.Command):
    """Worker -> main: the route for a domain, as mailhost.multiproc.lookups's JSON ("" when too big)."""

    arguments = [(b"domain", amp.Unicode())]
    response = [(b"json", amp.Unicode())]


class RecordsLookup(amp.Command):
    """Worker -> main: the records of one type for a name, as mailhost.multiproc.lookups's JSON."""

    arguments = [(b"name", amp.Unicode()), (b"rdtype", amp.Unicode())]
    response = [(b"json", amp.Unicode())]
