"""`mailhost sendmail`: the sendmail command line that cron, PHP's mail(),
Git and scripts use. Reads a message on stdin and exits 0 once it is safely
in the pickup folder (durable, as a 250 is).

Flags: -f SENDER, -F NAME, -t (recipients from To/Cc/Bcc; Bcc removed),
-i / -oi (a "." line does not end the message), and as Postfix's sendmail the RFC 3461
delivery notification requests: -N never|success,failure,delay (NOTIFY, for every
recipient), -R full|hdrs (RET) and -V ENVID; -B, -o*, -od* and -v are accepted and
ignored, as Postfix's sendmail does.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from mailhost.config import Config
from mailhost.doors.control import DaemonNotRunning, send_queue_command
from mailhost.doors.pickup import drop
from mailhost.feedback.suppression import SuppressionError, suppression_list
from mailhost.feedback.unsubscribe import UnsubscribeKeyError, UnsubscribeTokens, read_key
from mailhost.intake.origin import SENDMAIL, Origin
from mailhost.intake.policy import recipient_verdict
from mailhost.local.mailbox import LocalDomains
from mailhost.local.users import read_users_leniently
from mailhost.message import drop_field
from mailhost.smtp.wire import Address as ParsedAddress
from mailhost.smtp.wire import ENVID_MAX, SMTPError, parse_notify, parse_path, parse_ret


class SendmailError(Exception):
    """A one-line user error; exit 1."""


@dataclass
class SendmailArgs:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False  # -t
    dot_ends: bool = True  # no -i
    recipients: list[str] = field(default_factory=list)
    notify: list[str] | None = None  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V


def _option_value(item: str, items) -> str:
    value = item[2:] or next(items, None)
    if value is None:
        raise SendmailError(f"{item} needs a value")
    return value


def _notify_option(value: str) -> list[str]:
    """-N as RFC 3461 words (what Postfix's sendmail takes); a one-line error else."""
    try:
        return list(parse_notify(value.replace(" ", "")))
    except SMTPError as e:
        raise SendmailError(f"-N {value}: {e.reply.text}") from None


def _ret_option(value: str) -> str:
    try:
        return parse_ret(value)
    except SMTPError as e:
        raise SendmailError(f"-R {value}: {e.reply.text}") from None


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
        elif item.startswith("-N"):
            args.notify = _notify_option(_option_value(item, items))
        elif item.startswith("-R"):
            args.ret = _ret_option(_option_value(item, items))
        elif item.startswith("-V"):
            envid = _option_value(item, items)
            if not envid.isascii() or not envid.isprintable() or len(envid) > ENVID_MAX:
                raise SendmailError(f"-V: the envelope id must be at most {ENVID_MAX} printable ASCII characters")
            args.envid = envid
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


def prepare(message: bytes, args: SendmailArgs, sender: str, hostname: str) -> tuple[bytes, list[str]]:
    """Recipients (command line plus, with -t, To/Cc/Bcc) and the message with
    Bcc removed and From added when missing (the intake adds Date and Message-ID)."""
    header_block, body = _split(message)
    headers = BytesHeaderParser().parsebytes(header_block + b"\n")
    recipients = list(args.recipients)
    if args.from_headers:
        fields = headers.get_all("To", []) + headers.get_all("Cc", []) + headers.get_all("Bcc", [])
        recipients += [address for _, address in getaddresses([str(f) for f in fields]) if address]
        header_block = drop_field(header_block, b"bcc")
    added = []
    if "From" not in headers:
        display = args.full_name or ""
        added.append(f"From: {Address(display_name=display, addr_spec=sender)}\n" if sender else "From: MAILER-DAEMON\n")
    unique = list(dict.fromkeys(recipients))
    return header_block + "".join(added).encode("utf-8") + body, unique


def _check_address(address: str, what: str) -> ParsedAddress:
    try:
        return parse_path(f"<{address}>", utf8=True, null_ok=what == "sender", kind=what)[0]
    except SMTPError:
        raise SendmailError(f"{address!r} is not a valid {what} address") from None


def run(config: Config, argv: list[str], stdin=None) -> int:
    args = parse_args(argv)
    hostname = config.server.hostname
    user = getpass.getuser()
    sender = args.sender if args.sender is not None else f"{user}@{hostname}"
    sender = sender.strip("<>")
    if sender and "@" not in sender:
        sender = f"{sender}@{hostname}"  # `-f root`: qualified with our hostname, as Postfix's sendmail does
    if sender:
        _check_address(sender, "sender")
    message = read_message(stdin or sys.stdin.buffer, args.dot_ends)
    message, recipients = prepare(message, args, sender, hostname)
    # `sendmail root` from cron: an unqualified recipient is a user of our first domain, as
    # Postfix's sendmail appends $myorigin (our hostname may not be a domain we receive for).
    recipients = list(dict.fromkeys(r if "@" in r else f"{r}@{config.domains[0].name}" for r in recipients))
    if not recipients:
        raise SendmailError("no recipients (name them, or use -t to read them from the headers)")
    submitter = f"userid {os.getuid()} ({user}@{socket.gethostname()})"
    # The daemon's intake asks the same question again when it collects the message.
    domains = LocalDomains(config)
    suppression = suppression_list(config.server.state_dir)
    origin = Origin(SENDMAIL, submitter=submitter)
    unsubscribe = _unsubscribe_tokens(config)
    for address in recipients:
        parsed = _check_address(address, "recipient")
        domain = config.domain(parsed.domain)
        if domain is not None:
            # A users file this user may not read would make every local recipient "no such user".
            read_users_leniently(domain.users)
        try:
            verdict = recipient_verdict(parsed, origin, domains, suppression, sender=sender, unsubscribe=unsubscribe)
        except SuppressionError as e:
            raise SendmailError(f"{e}; nothing was sent") from None
        if not verdict.accepted:
            raise SendmailError(f"{verdict.reply.text}; nothing was sent")
    dsn = {"notify": args.notify, "ret": args.ret, "envid": args.envid}
    drop(config.server.state_dir, sender, recipients, submitter, message,
         {key: value for key, value in dsn.items() if value is not None})
    try:
        send_queue_command(config.server.state_dir, "pickup", None, timeout=5)
    except DaemonNotRunning:
        pass  # collected when the daemon starts
    except OSError:
        pass  # the message is safe in pickup; the daemon's timer collects it
    return 0


def _unsubscribe_tokens(config: Config) -> UnsubscribeTokens | None:
    """The daemon's unsubscribe tokens, to check unsubscribe+TOKEN recipients here as well;
    None when there is no key yet or this user may not read it (state_dir/unsubscribe.key is
    0600): such an address is then refused like any unknown local one."""
    try:
        key = read_key(config.server.state_dir)
    except UnsubscribeKeyError:
        return None
    return UnsubscribeTokens(key) if key is not None else None
