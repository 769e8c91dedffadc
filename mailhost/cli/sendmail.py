"""`mailhost sendmail`: the sendmail command line that cron, PHP's mail(),
Git and scripts use. Reads a message on stdin and exits 0 once it is safely
in the pickup folder (durable, as a 250 is).

Flags: -f SENDER, -F NAME, -t (recipients from To/Cc/Bcc; Bcc removed),
-i / -oi (a "." line does not end the message); -B, -o*, -od* and -v are
accepted and ignored, as Postfix's sendmail does.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.parser import BytesHeaderParser
from email.utils import formatdate, getaddresses, make_msgid

from mailhost.config import Config
from mailhost.doors.control import DaemonNotRunning, send_queue_command
from mailhost.local.mailbox import LocalDomains
from mailhost.doors.pickup import drop
from mailhost.smtp.wire import SMTPError, parse_path


class SendmailError(Exception):
    """A one-line user error; exit 1."""


@dataclass
class SendmailArgs:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False  # -t
    dot_ends: bool = True  # no -i
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> SendmailArgs:
    args = SendmailArgs()
    items = iter(argv)
    for item in items:
        if item in ("-i", "-oi"):
            args.dot_ends = False
        elif item == "-t":
            args.from_headers = True
        elif item.startswith("-f") or item.startswith("-r"):
            args.sender = item[2:] or next(items, None)
            if args.sender is None:
                raise SendmailError(f"{item} needs an address")
        elif item.startswith("-F"):
            args.full_name = item[2:] or next(items, "")
        elif item.startswith("-B"):
            if item == "-B":
                next(items, None)
        elif item.startswith("-o") or item == "-v" or item.startswith("-od") or item == "--":
            continue
        elif item.startswith("-"):
            raise SendmailError(f"unsupported option {item}")
        else:
            args.recipients.extend(a.strip() for a in item.split(",") if a.strip())
    return args


def read_message(stream, dot_ends: bool) -> bytes:
    """The message from stdin with LF line endings; without -i a lone "." line ends it."""
    data = stream.read().replace(b"\r\n", b"\n")
    if dot_ends:
        text = b"\n" + data
        end = text.find(b"\n.\n")
        if end < 0 and text.endswith(b"\n."):
            end = len(text) - 2
        if end >= 0:
            data = text[1 : end + 1]
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def _split(message: bytes) -> tuple[bytes, bytes]:
    end = message.find(b"\n\n")
    if end < 0:
        return (message, b"") if message[:1] not in (b"", b"\n") and b":" in message.split(b"\n", 1)[0] else (b"", message)
    return message[: end + 1], message[end + 1 :]


def _drop_header(header_block: bytes, name: bytes) -> bytes:
    """Remove every `name:` field (with its continuation lines) from a raw header block."""
    out, skipping = [], False
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"".join(out)


def prepare(message: bytes, args: SendmailArgs, sender: str, hostname: str) -> tuple[bytes, list[str]]:
    """Recipients (command line plus, with -t, To/Cc/Bcc) and the message with
    Bcc removed and Date, Message-ID and From added when missing."""
    header_block, body = _split(message)
    headers = BytesHeaderParser().parsebytes(header_block + b"\n")
    recipients = list(args.recipients)
    if args.from_headers:
        fields = headers.get_all("To", []) + headers.get_all("Cc", []) + headers.get_all("Bcc", [])
        recipients += [address for _, address in getaddresses([str(f) for f in fields]) if address]
        header_block = _drop_header(header_block, b"bcc")
    added = []
    if "From" not in headers:
        display = args.full_name or ""
        added.append(f"From: {Address(display_name=display, addr_spec=sender)}\n" if sender else "From: MAILER-DAEMON\n")
    if "Date" not in headers:
        added.append(f"Date: {formatdate(localtime=True)}\n")
    if "Message-ID" not in headers:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}\n")
    unique = list(dict.fromkeys(recipients))
    return header_block + "".join(added).encode("utf-8") + body, unique


def _check_address(address: str, what: str) -> None:
    try:
        parse_path(f"<{address}>", utf8=True, null_ok=what == "sender", kind=what)
    except SMTPError:
        raise SendmailError(f"{address!r} is not a valid {what} address") from None


def run(config: Config, argv: list[str], stdin=None) -> int:
    args = parse_args(argv)
    hostname = config.server.hostname
    user = getpass.getuser()
    sender = args.sender if args.sender is not None else f"{user}@{hostname}"
    sender = sender.strip("<>")
    if sender:
        _check_address(sender, "sender")
    message = read_message(stdin or sys.stdin.buffer, args.dot_ends)
    message, recipients = prepare(message, args, sender, hostname)
    if not recipients:
        raise SendmailError("no recipients (name them, or use -t to read them from the headers)")
    domains = LocalDomains(config)
    for address in recipients:
        _check_address(address, "recipient")
        local, _, domain = address.rpartition("@")
        if domains.is_local(domain) and not domains.resolve(local, domain).found:
            raise SendmailError(f"{address}: no such user here; nothing was sent")
    submitter = f"userid {os.getuid()} ({user}@{socket.gethostname()})"
    drop(config.server.state_dir, sender, recipients, submitter, message)
    try:
        send_queue_command(config.server.state_dir, "pickup", None, timeout=5)
    except DaemonNotRunning:
        pass  # collected when the daemon starts
    except OSError:
        pass  # the message is safe in pickup; the daemon's timer collects it
    return 0
