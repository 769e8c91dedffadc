"""The `mailhost` admin command.

Exit codes: 0 ok, 1 user error (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import getpass
import sys
from collections.abc import Sequence
from typing import NoReturn

from mailhost.config import Config, ConfigError, DomainConfig, load
from mailhost.local.mailbox import create_maildir, is_safe_local_part
from mailhost.ops.ownership import owner_of
from mailhost.queue.spool import SpoolError
from mailhost.local.users import (
    UserEntry,
    UsersFileError,
    hash_password,
    parse_local_part,
    parse_send_as,
    read_users,
    write_users,
)


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog.split()[0]} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailhost", description="Administer a mailhost installation.")
    parser.add_argument("--config", default="etc/mailhost.toml", help="configuration file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    commands.add_parser("check-config", help="validate the configuration; exit 0 or print the error and exit 1")
    commands.add_parser(
        "sendmail", help="sendmail-compatible injection from stdin: [-f SENDER] [-t] [-i] [RCPT ...]", add_help=False
    )

    user = commands.add_parser("user", help="manage mailbox users").add_subparsers(
        dest="user_command", required=True, metavar="add|passwd|del|list|may-send-as|admin", parser_class=_Parser
    )
    for name, text in (("add", "create a user and its Maildir"), ("passwd", "set a user's password")):
        sub = user.add_parser(name, help=text)
        sub.add_argument("address")
        sub.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user.add_parser("del", help="remove a user (its Maildir is kept)").add_argument("address")
    user.add_parser("list", help="list users")
    send_as = user.add_parser("may-send-as", help="show or set the other senders a user may use on the submission ports")
    send_as.add_argument("address")
    send_as.add_argument("senders", nargs="*", metavar="SENDER", help="an address, or @domain for all of a domain")
    send_as.add_argument("--clear", action="store_true", help="remove them all")
    # --- web console (issue 16) ---
    admin = user.add_parser("admin", help="let a user log in to the web console (--off: no longer)")
    admin.add_argument("address")
    admin.add_argument("--off", action="store_true", help="take the console login away")
    # --- end web console ---

    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="dkim_command", required=True, metavar="keygen", parser_class=_Parser
    )
    keygen = dkim.add_parser("keygen", help="make a signing key for a local domain and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", required=True, help="the DNS selector, e.g. s2026")
    keygen.add_argument("--algorithm", default="rsa-sha256", choices=["rsa-sha256", "ed25519-sha256"])

    # --- mailhost dns (issue 17) ---
    dns = commands.add_parser("dns", help="print every DNS record a local domain should publish, ready to paste")
    dns.add_argument("domain")
    # --- end mailhost dns ---

    from mailhost.cli import suppress

    suppress.add_parser(commands, _Parser)

    # --- apikey: the HTTP API's keys (mailhost.cli.apikey)
    from mailhost.cli import apikey

    apikey.add_parser(commands, _Parser)

    queue = commands.add_parser("queue", help="see and steer the outbound queue").add_subparsers(
        dest="queue_command", required=True, metavar="list|show|flush|delete|hold|release", parser_class=_Parser
    )
    queue.add_parser("list", help="queued messages").add_argument("--json", action="store_true", help="one JSON document")
    queue.add_parser("show", help="one message: envelope and headers").add_argument("id")
    queue.add_parser("flush", help="retry now (one message or all)").add_argument("id", nargs="?")
    for name, text in (("delete", "remove a message without bouncing it"), ("hold", "keep a message from being tried"),
                       ("release", "let a held message be tried again")):
        queue.add_parser(name, help=text).add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "sendmail" in argv:
        # sendmail's own flags (-t, -oi, -fSENDER) are not argparse's: split them off.
        at = argv.index("sendmail")
        return _sendmail(build_parser().parse_args([*argv[:at], "check-config"]).config, argv[at + 1 :])
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.command == "check-config":
            return check_config(config)
        if args.command == "suppress":
            return suppress_command(config, args)
        if args.command == "apikey":
            return apikey_command(config, args)
        if args.command == "dkim":
            return dkim_keygen(config, args)
        if args.command == "dns":
            return dns_records(config, args)
        if args.command == "queue":
            from mailhost.cli.queue import run_queue_command

            return run_queue_command(config, args)
        commands = {"add": user_add, "passwd": user_passwd, "del": user_del, "list": user_list,
                    "may-send-as": user_may_send_as, "admin": user_admin}
        return commands[args.user_command](config, args)
    except (ConfigError, UserError, UsersFileError, SpoolError) as e:
        sys.stderr.write(f"mailhost: {e}\n")
        return 1
    except OSError as e:  # no permission, a full disk, ...: what and where, not a traceback
        sys.stderr.write(f"mailhost: {os_error_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("mailhost: interrupted\n")
        return 1


def _sendmail(config_path: str, sendmail_argv: list[str]) -> int:
    from mailhost.cli.sendmail import SendmailError, run

    try:
        return run(load(config_path), sendmail_argv)
    except (ConfigError, SendmailError, UsersFileError) as e:
        sys.stderr.write(f"mailhost sendmail: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"mailhost sendmail: {os_error_line(e)}\n")
        return 1


def os_error_line(error: OSError) -> str:
    """An OSError as one line: the file, what went wrong, and for a permission what to do."""
    text = f"{error.filename}: {error.strerror}" if error.filename else (error.strerror or str(error))
    if isinstance(error, PermissionError):
        # State belongs to the daemon's user (DESIGN.md "One owner for state").
        text += " (run this as root or as the owner of state_dir)"
    return text


def suppress_command(config: Config, args: argparse.Namespace) -> int:
    from mailhost.cli.suppress import SuppressUsageError, run

    try:
        return run(config, args)
    except SuppressUsageError as e:
        raise UserError(str(e)) from None


def apikey_command(config: Config, args: argparse.Namespace) -> int:
    from mailhost.cli.apikey import ApiKeyError, run

    try:
        return run(config, args)
    except ApiKeyError as e:
        raise UserError(str(e)) from None


def dkim_keygen(config: Config, args: argparse.Namespace) -> int:
    from mailhost.authn.dkim import DkimKeyError, generate

    domain = config.domain(args.domain)
    if domain is None:
        raise UserError(f"{args.domain} is not a local domain (local domains: {', '.join(d.name for d in config.domains)})")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", args.selector):
        raise UserError(f"selector {args.selector!r}: use letters, digits and hyphens, e.g. s2026")
    try:
        path, record = generate(config.server.state_dir, domain.name, args.selector, args.algorithm)
    except DkimKeyError as e:
        raise UserError(str(e)) from None
    from mailhost.cli.dns import txt

    print(f"; key written to {path}; mail from {domain.name} is signed with it from now on")
    print(txt(f"{args.selector}._domainkey.{domain.name}.", record))  # strings of at most 255 octets
    return 0


def dns_records(config: Config, args: argparse.Namespace) -> int:
    from mailhost.cli.dns import run

    try:
        return run(config, args.domain)
    except LookupError as e:
        raise UserError(str(e)) from None


def check_config(config: Config) -> int:
    from mailhost.ops.tls import TLSSetupError, server_tls_options, tls_pair_paths

    cert, key = tls_pair_paths(config)
    if config.server.tls_cert is not None:
        try:
            server_tls_options(cert, key)
        except TLSSetupError as e:
            raise UserError(str(e)) from None
    for domain in config.domains:
        read_users(domain.users)  # a malformed users file is a config error too
    from mailhost.authn.dkim import DkimKeyError, configured_keys

    try:
        configured_keys(config.dkim)  # each [[dkim]] key signs a probe message, or says why not
    except DkimKeyError as e:
        raise UserError(str(e)) from None
    workers = config.server.workers
    processes = f"{workers} process{'es' if workers > 1 else ''}" + (" (workers = auto: one per usable core)"
                                                                     if config.server.workers_auto else "")
    print(f"{config.path}: ok ({len(config.domains)} domains, {len(config.listeners)} listeners, {processes})")
    return 0


def _split_address(config: Config, address: str) -> tuple[str, DomainConfig]:
    local, at, domain_name = address.rpartition("@")
    if not at or not local:
        raise UserError(f"{address!r} is not an address such as alice@example.test")
    domain = config.domain(domain_name)
    if domain is None:
        local_domains = ", ".join(d.name for d in config.domains)
        raise UserError(f"{domain_name} is not a local domain (local domains: {local_domains})")
    try:
        local = parse_local_part(local)
    except ValueError as e:
        raise UserError(f"{local!r} cannot be a mailbox name: it {e}") from None
    if not is_safe_local_part(local):  # parse_local_part refuses these too; the folder name depends on it
        raise UserError(f"{local!r} cannot be a mailbox name")
    return local, domain


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.address}: ")
        if password != getpass.getpass("Again: "):
            raise UserError("the two passwords differ; nothing changed")
    if not password:
        raise UserError("empty password; nothing changed")
    return password


def user_add(config: Config, args: argparse.Namespace) -> int:
    local, domain = _split_address(config, args.address)
    address = f"{local}@{domain.name}"
    entries = read_users(domain.users)
    if address in entries:
        raise UserError(f"{address} already exists (use `mailhost user passwd {address}`)")
    entries[address] = UserEntry(address, hash_password(_read_password(args)))
    owner = owner_of(config.server.state_dir)  # run as root: the daemon's user must read both
    created = create_maildir(domain.maildir / local, owner)
    try:
        write_users(domain.users, entries, owner)
    except BaseException:
        for folder in reversed(created):  # the user was not added: no Maildir of a user that is not there
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    print(f"added {address} (Maildir {domain.maildir / local})")
    return 0


def _existing_user(config: Config, given: str, hint: bool = True) -> tuple[str, str, DomainConfig, dict[str, UserEntry]]:
    """(address, local part, domain, the domain's users file entries) of a user that exists."""
    local, domain = _split_address(config, given)
    address = f"{local}@{domain.name}"
    entries = read_users(domain.users)
    if address not in entries:
        raise UserError(f"{address} does not exist" + (f" (use `mailhost user add {address}`)" if hint else ""))
    return address, local, domain, entries


def user_passwd(config: Config, args: argparse.Namespace) -> int:
    address, _, domain, entries = _existing_user(config, args.address)
    entries[address] = dataclasses.replace(entries[address], password_hash=hash_password(_read_password(args)))
    write_users(domain.users, entries, owner_of(config.server.state_dir))
    print(f"password changed for {address}")
    return 0


def user_del(config: Config, args: argparse.Namespace) -> int:
    address, local, domain, entries = _existing_user(config, args.address, hint=False)
    del entries[address]
    write_users(domain.users, entries, owner_of(config.server.state_dir))
    print(f"deleted {address} (its Maildir {domain.maildir / local} is kept)")
    return 0


def user_may_send_as(config: Config, args: argparse.Namespace) -> int:
    """No senders: show the list; senders: replace it; --clear: empty it."""
    address, _, domain, entries = _existing_user(config, args.address)
    if args.clear and args.senders:
        raise UserError("give senders or --clear, not both")
    if args.senders or args.clear:
        try:
            senders = parse_send_as(",".join(args.senders)) if args.senders else ()
        except ValueError as e:
            raise UserError(f"{e} is not an address or @domain (such as news@example.test or @example.test)") from None
        entries[address] = dataclasses.replace(entries[address], may_send_as=senders)
        write_users(domain.users, entries, owner_of(config.server.state_dir))
    senders = entries[address].may_send_as
    print(f"{address} may send as: {' '.join(senders) if senders else '(its own addresses only)'}")
    return 0


def user_admin(config: Config, args: argparse.Namespace) -> int:
    """Set or clear the user's console flag (web console, /console/login)."""
    address, _, domain, entries = _existing_user(config, args.address)
    entries[address] = dataclasses.replace(entries[address], admin=not args.off)
    write_users(domain.users, entries, owner_of(config.server.state_dir))
    print(f"{address} {'may no longer' if args.off else 'may now'} log in to the web console")
    return 0


def user_list(config: Config, args: argparse.Namespace) -> int:
    addresses: set[str] = set()
    for domain in config.domains:
        addresses.update(a for a in read_users(domain.users) if a.endswith(f"@{domain.name}"))
    for address in sorted(addresses):
        print(address)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
