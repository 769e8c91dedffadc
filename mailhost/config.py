"""The TOML configuration, read into frozen dataclasses.

Every error is a ConfigError whose text is one line naming the file, the key,
what was found and what is allowed; callers print it and exit 1.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


ROLES = ("mx", "submission", "submissions")
RELAY_TLS = ("opportunistic", "required", "none")
SMARTHOST_TLS = ("starttls", "implicit", "none")

MAX_WORKERS = 64

_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def usable_cores() -> int:
    """What `workers = "auto"` means: the cores this process may run on (its CPU affinity, which
    taskset, cgroup cpusets and systemd's CPUAffinity= narrow), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform (macOS): every core
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class ConfigError(Exception):
    """A user mistake in the configuration: str(error) is the whole message."""


@dataclass(frozen=True)
class ThrottleRule:
    name: str
    mx_domains: tuple[str, ...]  # MX host name suffixes, e.g. ("google.com", "googlemail.com")
    connections: int
    rate: float  # messages per minute at most; 0 = no pace
    floor: float  # messages per minute the rate never drops below


# What the big providers tolerate from a new sender without deferring much
# (conservative; operators raise them with [[throttle]] entries).
DEFAULT_RULES = (
    ThrottleRule("google", ("google.com", "googlemail.com"), 10, 600.0, 10.0),
    ThrottleRule("yahoo", ("yahoodns.net", "yahoo.com"), 5, 300.0, 10.0),
    ThrottleRule("microsoft", ("outlook.com", "hotmail.com"), 5, 300.0, 10.0),
    ThrottleRule("apple", ("icloud.com", "me.com"), 5, 300.0, 10.0),
)


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    state_dir: Path
    tls_cert: Path | None
    tls_key: Path | None
    workers: int = 1  # reactor processes sharing the listeners: this one and workers - 1 more
    workers_auto: bool = False  # workers = "auto" (the default): `workers` is the number of usable cores


@dataclass(frozen=True)
class ListenerConfig:
    role: str
    endpoint: str


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = 36700160
    recipients: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    connections_per_ip: int = 20
    auth_failures: int = 3
    greet_pause: float = 1.0
    tls_handshake_timeout: float = 30.0  # implicit TLS and STARTTLS: then the connection is dropped
    session_timeout: float = 1800.0  # a deadline for the whole session, however busy: then 421 4.4.2
    junk_commands: int = 100  # NOOP, RSET, VRFY, HELP, HELO/EHLO, RCPT past the limit: then 421 4.7.0
    connections: int = 1000  # sessions at once over every listener and address: 421 4.7.0 beyond


@dataclass(frozen=True)
class DomainConfig:
    name: str
    maildir: Path
    users: Path
    catch_all: str | None
    aliases: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class SmartHostConfig:
    host: str
    port: int
    tls: str
    username: str | None
    password_file: Path | None
    ca_file: Path | None = None  # trust these CAs instead of the system's (a private smart host)


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    mx_port: int = 25
    nameservers: tuple[tuple[str, int], ...] = ()
    tls: str = "opportunistic"
    smarthosts: tuple[SmartHostConfig, ...] = ()
    verp: bool = False  # per-recipient envelope sender bounces+<rcpt>@<sender domain> for local senders
    # --- MTA-STS, DANE, TLS-RPT (outbound) ---
    mta_sts: bool = True  # honour MTA-STS policies (RFC 8461) and send TLS-RPT reports (RFC 8460)
    dane: bool = False  # require TLSA matches when the validating resolver says they are authentic (RFC 7672)
    ca_file: Path | None = None  # trust these CAs (not the system's) for MTA-STS fetches and verified MX TLS
    mta_sts_port: int = 443  # the port of https://mta-sts.DOMAIN/ (tests; RFC 8461 says 443)
    tls_report_interval: float = 86400.0  # the TLS-RPT report period (RFC 8460: a UTC day)


@dataclass(frozen=True)
class QueueConfig:
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    concurrency: int = 100  # messages being delivered at once (Postfix: default_process_limit = 100)
    per_destination: int = 20  # connections at once to one destination (Postfix: default_destination_concurrency_limit = 20)
    max_attempts: int = 0  # 0: no limit; else return to sender after this many failed attempts
    marketing_lifetime: float = 86400.0  # lifetime of mail from [unsubscribe] senders


@dataclass(frozen=True)
class MetricsConfig:
    endpoint: str | None = None  # Prometheus text on /metrics and /healthz; None: not served


@dataclass(frozen=True)
class SubmissionConfig:
    hide_client: bool = False  # leave the client's address (and HELO name) out of Received:


@dataclass(frozen=True)
class DkimConfig:
    domain: str
    selector: str
    key_file: Path
    algorithm: str = "rsa-sha256"  # or ed25519-sha256


@dataclass(frozen=True)
class InboundConfig:
    authenticate: bool = True  # SPF, DKIM and DMARC on mail from outside, into Authentication-Results:
    dmarc_reject: bool = False  # refuse mail whose DMARC fails under p=reject (550 5.7.1)


@dataclass(frozen=True)
class BouncesConfig:
    consume: bool = True  # a VERP bounce updates the suppression list and is not delivered
    soft_limit: int = 3  # soft bounces within soft_window that suppress an address
    soft_window: float = 7 * 86400.0
    # A policy, authentication or content block pauses its destination group this long
    # (its pace also drops to the floor); 0: only the pace drops.
    block_pause: float = 900.0


BOUNCE_CLASSES = ("invalid_recipient", "mailbox_full", "policy", "authentication", "content", "rate_limit",
                  "too_large", "routing", "tls", "other")
WEBHOOK_EVENTS = ("delivered", "deferred", "bounced", "complained", "unsubscribed", "suppressed")
WEBHOOK_FORMATS = ("json", "listmonk")


@dataclass(frozen=True)
class BounceRule:
    """[[bounce_rule]]: a reply (code, status and text) matching `pattern` is of `category`."""
    pattern: re.Pattern[str]
    category: str  # one of BOUNCE_CLASSES


@dataclass(frozen=True)
class HttpConfig:
    endpoint: str | None = None  # HTTPS listener (the server's TLS pair); None: not served
    public_url: str | None = None  # base URL of List-Unsubscribe links; default https://<hostname>


@dataclass(frozen=True)
class UnsubscribeConfig:
    add_headers: bool = False  # add RFC 8058 List-Unsubscribe headers to marketing mail that has none
    senders: tuple[str, ...] = ()  # lowercased addresses, or "@domain": whose mail is marketing
    feedback_id: str | None = None  # Feedback-ID: template ({campaign}, {sender_domain}, {user}); None: not added

    def is_marketing(self, sender: str) -> bool:
        """Whether mail from envelope or From: address `sender` counts as marketing."""
        sender = sender.strip().strip("<>").lower()
        if not sender:
            return False
        return sender in self.senders or "@" + sender.rpartition("@")[2] in self.senders


@dataclass(frozen=True)
class FeedbackConfig:
    addresses: tuple[str, ...] = ()  # lowercased addresses where ARF complaint reports arrive


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    secret_file: Path | None = None  # HMAC-SHA256 key for the signature header
    events: tuple[str, ...] = WEBHOOK_EVENTS
    format: str = "json"  # json | listmonk
    ca_file: Path | None = None
    username: str | None = None  # HTTP basic auth (listmonk's API user)
    password_file: Path | None = None


# --- [mta_sts] and [srs] (issue 17) ------------------------------------------------------
MTA_STS_MODES = ("testing", "enforce", "none")


@dataclass(frozen=True)
class MtaStsConfig:
    """Our own MTA-STS policy (RFC 8461 3.2), served for every local domain on [http]."""

    mode: str = "testing"  # testing | enforce | none
    max_age: int = 604800  # seconds senders may cache the policy
    mx: tuple[str, ...] = ()  # MX host name patterns ("*.example.org" allowed); empty: the server's hostname


@dataclass(frozen=True)
class SrsConfig:
    """SRS return paths for mail aliases forward to remote addresses (mailhost.feedback.srs)."""

    enabled: bool = True
    max_age_days: int = 21  # how long a bounce to an SRS address is accepted
# --- end [mta_sts] and [srs] ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    listeners: tuple[ListenerConfig, ...]
    limits: LimitsConfig
    domains: tuple[DomainConfig, ...]
    relay: RelayConfig
    queue: QueueConfig = field(default_factory=QueueConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    throttles: tuple[ThrottleRule, ...] = DEFAULT_RULES
    inbound: InboundConfig = field(default_factory=InboundConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    dkim: tuple[DkimConfig, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    unsubscribe: UnsubscribeConfig = field(default_factory=UnsubscribeConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    bounce_rules: tuple[BounceRule, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    srs: SrsConfig = field(default_factory=SrsConfig)

    def domain(self, name: str) -> DomainConfig | None:
        """The local domain called `name` (case-insensitive), or None."""
        name = name.lower()
        for domain in self.domains:
            if domain.name == name:
                return domain
        return None


def load(path: str | Path) -> Config:
    """Read and validate the configuration file at `path`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give one with --config PATH)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return _Reader(path).config(data)


def parse_duration(text: str) -> float:
    """'90s', '5m', '4h', '5d' -> seconds; '0' -> 0. Raises ValueError."""
    if text == "0":
        return 0.0
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(text)
    return float(int(match.group(1)) * _UNITS[match.group(2)])


class _Reader:
    """Walks the parsed TOML, keeping the file path for error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent

    def fail(self, key: str, found: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: found {found!r}, expected {allowed}")

    def resolve(self, value: str) -> Path:
        # Relative paths are relative to the folder holding the config file.
        return (self.base / value).resolve() if not Path(value).is_absolute() else Path(value)

    def table(self, data: dict, key: str, allowed: set[str]) -> dict:
        return self.check_table(data.get(key, {}), key, allowed)

    def check_table(self, value: Any, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, value, "a table")
        for name in value:
            if name not in allowed:
                shown = name if name.isidentifier() else repr(name)
                raise ConfigError(
                    f"{self.path}: {key}.{shown}: unknown key (allowed: {', '.join(sorted(allowed))})"
                )
        return value

    def string(self, table: dict, key: str, name: str, default: str | None = None) -> str | None:
        value = table.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key}.{name}", value, "a non-empty string")
        return value

    def integer(self, table: dict, key: str, name: str, default: int, low: int, high: int) -> int:
        value = table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(f"{key}.{name}", value, f"a whole number from {low} to {high}")
        return value

    def duration(self, table: dict, key: str, name: str, default: float) -> float:
        value = table.get(name)
        if value is None:
            return default
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            return parse_duration(value)
        except ValueError:
            raise self.fail(f"{key}.{name}", value, 'a duration such as "30s", "5m", "4h" or "5d"') from None

    def boolean(self, table: dict, key: str, name: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key}.{name}", value, "true or false")
        return value

    def choice(self, table: dict, key: str, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = table.get(name, default)
        if value not in allowed:
            raise self.fail(f"{key}.{name}", value, "one of " + ", ".join(allowed))
        return value

    def config(self, data: dict) -> Config:
        top = {"server", "listener", "limits", "domain", "relay", "queue", "submission", "metrics", "throttle",
               "inbound", "bounces", "dkim", "http", "unsubscribe", "feedback", "bounce_rule", "webhook",
               "mta_sts", "srs"}
        self.check_table(data, "(top level)", top)
        server = self.server(self.table(data, "server", {"hostname", "state_dir", "tls_cert", "tls_key", "workers"}))
        listeners = self.listeners(data.get("listener"))
        limits = self.limits(self.table(data, "limits", set(LimitsConfig.__dataclass_fields__)))
        domains = self.domains(data.get("domain"), server.state_dir)
        relay = self.relay(self.table(data, "relay", {"networks", "mx_port", "nameservers", "tls", "smarthost", "verp",
                                                          "mta_sts", "dane", "ca_file", "mta_sts_port",
                                                          "tls_report_interval"}))
        queue = self.queue(self.table(data, "queue", {"retry", "lifetime", "delay_warning", "concurrency", "per_destination",
                                                      "max_attempts", "marketing_lifetime"}))
        metrics_table = self.table(data, "metrics", {"endpoint"})
        metrics_endpoint = self.string(metrics_table, "metrics", "endpoint")
        if metrics_endpoint is not None:
            _check_endpoint(self, "metrics.endpoint", metrics_endpoint)
        submission = self.submission(self.table(data, "submission", {"hide_client"}))
        inbound = self.table(data, "inbound", {"authenticate", "dmarc_reject"})
        bounces = self.table(data, "bounces", {"consume", "soft_limit", "soft_window", "block_pause"})
        return Config(
            self.path, server, listeners, limits, domains, relay, queue, submission=submission,
            metrics=MetricsConfig(metrics_endpoint), throttles=self.throttles(data.get("throttle", [])),
            dkim=self.dkim(data.get("dkim", [])),
            inbound=InboundConfig(self.boolean(inbound, "inbound", "authenticate", True),
                                  self.boolean(inbound, "inbound", "dmarc_reject", False)),
            bounces=BouncesConfig(self.boolean(bounces, "bounces", "consume", True),
                                  self.integer(bounces, "bounces", "soft_limit", 3, 1, 1000),
                                  self.duration(bounces, "bounces", "soft_window", 7 * 86400.0),
                                  self.duration(bounces, "bounces", "block_pause", 900.0)),
            http=self.http(self.table(data, "http", {"endpoint", "public_url"})),
            unsubscribe=self.unsubscribe(self.table(data, "unsubscribe", {"add_headers", "senders", "feedback_id"})),
            feedback=FeedbackConfig(self.addresses(self.table(data, "feedback", {"addresses"}), "feedback", "addresses",
                                                   allow_domains=False)),
            bounce_rules=self.bounce_rules(data.get("bounce_rule", [])),
            webhooks=self.webhooks(data.get("webhook", [])),
            mta_sts=self.mta_sts(self.table(data, "mta_sts", {"mode", "max_age", "mx"})),
            srs=self.srs(self.table(data, "srs", {"enabled", "max_age"})),
        )

    # --- [mta_sts] and [srs] (issue 17) ---
    def mta_sts(self, table: dict) -> MtaStsConfig:
        mode = self.choice(table, "mta_sts", "mode", "testing", MTA_STS_MODES)
        max_age = self.duration(table, "mta_sts", "max_age", 604800.0)
        if not 0 < max_age <= 31557600:  # RFC 8461 3.2: at most 31557600 seconds (a year)
            raise self.fail("mta_sts.max_age", table.get("max_age"), 'a duration from "1s" to "365d"')
        mx = table.get("mx", [])
        allowed = 'a list of MX host names such as ["mail.example.org", "*.example.net"]'
        if not isinstance(mx, list) or not all(isinstance(m, str) and _is_domain(m.removeprefix("*."))
                                               and not m.endswith(".") for m in mx):
            raise self.fail("mta_sts.mx", mx, allowed)
        return MtaStsConfig(mode, int(max_age), tuple(m.lower() for m in mx))

    def srs(self, table: dict) -> SrsConfig:
        max_age = self.duration(table, "srs", "max_age", 21 * 86400.0)
        if max_age % 86400 or not 86400 <= max_age <= 1000 * 86400:  # the stamp counts days, modulo 1024
            raise self.fail("srs.max_age", table.get("max_age"), 'whole days from "1d" to "1000d"')
        return SrsConfig(self.boolean(table, "srs", "enabled", True), int(max_age // 86400))
    # --- end [mta_sts] and [srs] ---

    def http(self, table: dict) -> HttpConfig:
        endpoint = self.string(table, "http", "endpoint")
        if endpoint is not None:
            _check_endpoint(self, "http.endpoint", endpoint)
        public_url = self.string(table, "http", "public_url")
        if public_url is not None and not re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s?#]*)?", public_url):
            raise self.fail("http.public_url", public_url, 'an https URL such as "https://mail.example.org"')
        return HttpConfig(endpoint, public_url.rstrip("/") if public_url else None)

    def addresses(self, table: dict, key: str, name: str, allow_domains: bool) -> tuple[str, ...]:
        value = table.get(name, [])
        allowed = 'a list of addresses such as ["news@example.org"' + (', "@example.org"]' if allow_domains else "]")
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise self.fail(f"{key}.{name}", value, allowed)
        found = []
        for address in value:
            local, at, domain = address.strip().rpartition("@")
            if not at or not _is_domain(domain) or (not local and not allow_domains) or any(
                    c.isspace() or c in "<>\"" for c in local):
                raise self.fail(f"{key}.{name}", address, allowed)
            found.append(f"{local}@{domain.rstrip('.')}".lower())
        return tuple(found)

    def unsubscribe(self, table: dict) -> UnsubscribeConfig:
        template = self.string(table, "unsubscribe", "feedback_id")
        if template is not None:
            try:
                template.format(campaign="c", sender_domain="d", user="u")
            except (KeyError, IndexError, ValueError):
                raise self.fail("unsubscribe.feedback_id", template,
                                'a template such as "{campaign}:{user}:{sender_domain}:mailhost"') from None
        return UnsubscribeConfig(self.boolean(table, "unsubscribe", "add_headers", False),
                                 self.addresses(table, "unsubscribe", "senders", allow_domains=True), template)

    def bounce_rules(self, value: Any) -> tuple[BounceRule, ...]:
        if not isinstance(value, list):
            raise self.fail("bounce_rule", value, "[[bounce_rule]] tables")
        rules = []
        for index, raw in enumerate(value):
            key = f"bounce_rule[{index}]"
            table = self.check_table(raw, key, {"match", "class"})
            pattern = self.string(table, key, "match")
            if pattern is None:
                raise self.fail(f"{key}.match", None, "a regular expression on the reply")
            try:
                compiled = re.compile(pattern, re.IGNORECASE)
            except re.error as e:
                raise self.fail(f"{key}.match", pattern, f"a regular expression ({e})") from None
            category = table.get("class")
            if category not in BOUNCE_CLASSES:
                raise self.fail(f"{key}.class", category, "one of " + ", ".join(BOUNCE_CLASSES))
            rules.append(BounceRule(compiled, category))
        return tuple(rules)

    def webhooks(self, value: Any) -> tuple[WebhookConfig, ...]:
        if not isinstance(value, list):
            raise self.fail("webhook", value, "[[webhook]] tables")
        hooks = []
        for index, raw in enumerate(value):
            key = f"webhook[{index}]"
            table = self.check_table(raw, key, {"url", "secret_file", "events", "format", "ca_file", "username",
                                                "password_file"})
            url = self.string(table, key, "url")
            if url is None or not re.fullmatch(r"https?://[^\s/?#]+(/[^\s#]*)?", url):
                raise self.fail(f"{key}.url", url, 'an http(s) URL such as "https://crm.example.org/hooks/mail"')
            events = table.get("events", list(WEBHOOK_EVENTS))
            if not isinstance(events, list) or not events or not all(e in WEBHOOK_EVENTS for e in events):
                raise self.fail(f"{key}.events", events, "a list of " + ", ".join(WEBHOOK_EVENTS))
            files = {}
            for name in ("secret_file", "ca_file", "password_file"):
                path = self.string(table, key, name)
                if path is not None and not self.resolve(path).is_file():
                    raise ConfigError(f"{self.path}: {key}.{name}: {self.resolve(path)} is not a readable file")
                files[name] = self.resolve(path) if path else None
            username = self.string(table, key, "username")
            if (username is None) != (files["password_file"] is None):
                raise ConfigError(f"{self.path}: {key}: give both username and password_file, or neither")
            hooks.append(WebhookConfig(url, files["secret_file"], tuple(dict.fromkeys(events)),
                                       self.choice(table, key, "format", "json", WEBHOOK_FORMATS), files["ca_file"],
                                       username, files["password_file"]))
        return tuple(hooks)

    def submission(self, table: dict) -> SubmissionConfig:
        return SubmissionConfig(hide_client=self.boolean(table, "submission", "hide_client", False))

    def server(self, table: dict) -> ServerConfig:
        hostname = self.string(table, "server", "hostname") or socket.getfqdn()
        if not _is_domain(hostname):
            raise self.fail("server.hostname", hostname, "a host name such as mail.example.org")
        state_dir = self.resolve(self.string(table, "server", "state_dir", "../var"))
        cert = self.string(table, "server", "tls_cert")
        key = self.string(table, "server", "tls_key")
        if (cert is None) != (key is None):
            missing = "tls_key" if key is None else "tls_cert"
            raise ConfigError(f"{self.path}: server.{missing}: missing; give both tls_cert and tls_key, or neither")
        cert_path = self.resolve(cert) if cert else None
        key_path = self.resolve(key) if key else None
        for name, tls_path in (("tls_cert", cert_path), ("tls_key", key_path)):
            if tls_path is not None and not tls_path.is_file():
                raise ConfigError(f"{self.path}: server.{name}: {tls_path} is not a readable file")
        workers = table.get("workers", "auto")
        auto = workers == "auto"
        if auto:
            workers = usable_cores()
        elif isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise self.fail("server.workers", workers, f'"auto" (one per usable core) or a whole number from 1 to {MAX_WORKERS}')
        return ServerConfig(hostname.lower(), state_dir, cert_path, key_path, workers, auto)

    def listeners(self, value: Any) -> tuple[ListenerConfig, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail("listener", value, "at least one [[listener]] table")
        result = []
        for index, raw in enumerate(value):
            key = f"listener[{index}]"
            table = self.check_table(raw, key, {"role", "endpoint"})
            role = self.choice(table, key, "role", "", ROLES)
            endpoint = self.string(table, key, "endpoint")
            if endpoint is None:
                raise self.fail(f"{key}.endpoint", None, 'a Twisted endpoint such as "tcp:2525:interface=127.0.0.1"')
            if role == "submissions" and endpoint.split(":", 1)[0] in ("ssl", "tls"):
                # mailhost wraps this role in TLS itself, with the configured (and reloadable) pair.
                raise self.fail(f"{key}.endpoint", endpoint, 'a plain endpoint such as "tcp:465" (the submissions role adds TLS)')
            _check_endpoint(self, f"{key}.endpoint", endpoint)
            result.append(ListenerConfig(role, endpoint))
        return tuple(result)

    def limits(self, table: dict) -> LimitsConfig:
        d = LimitsConfig()
        return LimitsConfig(
            message_size=self.integer(table, "limits", "message_size", d.message_size, 1024, 2**40),
            recipients=self.integer(table, "limits", "recipients", d.recipients, 1, 100000),
            command_timeout=self.duration_or_seconds(table, "command_timeout", d.command_timeout),
            data_timeout=self.duration_or_seconds(table, "data_timeout", d.data_timeout),
            connections_per_ip=self.integer(table, "limits", "connections_per_ip", d.connections_per_ip, 1, 100000),
            auth_failures=self.integer(table, "limits", "auth_failures", d.auth_failures, 1, 1000),
            greet_pause=self.duration(table, "limits", "greet_pause", d.greet_pause),
            tls_handshake_timeout=self.duration_or_seconds(table, "tls_handshake_timeout", d.tls_handshake_timeout),
            session_timeout=self.duration_or_seconds(table, "session_timeout", d.session_timeout),
            junk_commands=self.integer(table, "limits", "junk_commands", d.junk_commands, 1, 10**9),
            connections=self.integer(table, "limits", "connections", d.connections, 1, 10**6),
        )

    def duration_or_seconds(self, table: dict, name: str, default: float) -> float:
        # Timeouts are shown as plain seconds in the docs; accept a duration string too.
        value = table.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise self.fail(f"limits.{name}", value, "a positive number of seconds")
            return float(value)
        seconds = self.duration(table, "limits", name, default)
        if seconds <= 0:
            raise self.fail(f"limits.{name}", value, "a positive number of seconds")
        return seconds

    def domains(self, value: Any, state_dir: Path) -> tuple[DomainConfig, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail("domain", value, "at least one [[domain]] table")
        result: list[DomainConfig] = []
        for index, raw in enumerate(value):
            key = f"domain[{index}]"
            table = self.check_table(raw, key, {"name", "maildir", "users", "catch_all", "aliases"})
            name = self.string(table, key, "name")
            if name is None or not _is_domain(name):
                raise self.fail(f"{key}.name", name, "a domain name such as example.test")
            name = name.lower()
            if any(d.name == name for d in result):
                raise self.fail(f"{key}.name", name, "a domain not already configured")
            maildir = self.resolve(self.string(table, key, "maildir") or str(state_dir / "mail" / name))
            users = self.resolve(self.string(table, key, "users") or str(state_dir / "users"))
            catch_all = self.string(table, key, "catch_all")
            if catch_all is not None and not _is_local_target(catch_all):
                raise self.fail(f"{key}.catch_all", catch_all, "a local user name such as alice")
            aliases = self.aliases(self.check_table(table.get("aliases", {}), f"{key}.aliases", _AnyKey()), key)
            result.append(DomainConfig(name, maildir, users, catch_all and catch_all.lower(), aliases))
        return tuple(result)

    def aliases(self, table: dict, key: str) -> dict[str, tuple[str, ...]]:
        result = {}
        for local, targets in table.items():
            if not _is_local_target(local):
                raise self.fail(f"{key}.aliases", local, "local parts without @, / or NUL as alias names")
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
                raise self.fail(f"{key}.aliases.{local}", targets, "a list of local users or addresses")
            for target in targets:
                target_local, at, target_domain = target.rpartition("@")
                valid = _is_local_target(target_local) and _is_domain(target_domain) if at else _is_local_target(target)
                if not valid:
                    raise self.fail(f"{key}.aliases.{local}", target, "a local user name or an address")
            result[local.lower()] = tuple(t.lower() if "@" not in t else t for t in targets)
        return result

    def relay(self, table: dict) -> RelayConfig:
        networks = table.get("networks", ["127.0.0.0/8", "::1/128"])
        if not isinstance(networks, list):
            raise self.fail("relay.networks", networks, 'a list of networks such as ["127.0.0.0/8"]')
        parsed = []
        for network in networks:
            try:
                if not isinstance(network, str):
                    raise TypeError(network)
                parsed.append(ipaddress.ip_network(network, strict=False))
            except (ValueError, TypeError):
                raise self.fail("relay.networks", network, "an IP network such as 127.0.0.0/8 or ::1/128") from None
        nameservers = table.get("nameservers", [])
        if not isinstance(nameservers, list):
            raise self.fail("relay.nameservers", nameservers, 'a list such as ["127.0.0.1:5353"]')
        servers = tuple(self.nameserver(ns) for ns in nameservers)
        smarthosts = table.get("smarthost", [])
        if not isinstance(smarthosts, list):
            raise self.fail("relay.smarthost", smarthosts, "[[relay.smarthost]] tables")
        return RelayConfig(
            networks=tuple(parsed),
            mx_port=self.integer(table, "relay", "mx_port", 25, 1, 65535),
            nameservers=servers,
            tls=self.choice(table, "relay", "tls", "opportunistic", RELAY_TLS),
            smarthosts=tuple(self.smarthost(raw, f"relay.smarthost[{i}]") for i, raw in enumerate(smarthosts)),
            verp=self.boolean(table, "relay", "verp", False),
            mta_sts=self.boolean(table, "relay", "mta_sts", True),
            dane=self.boolean(table, "relay", "dane", False),
            ca_file=self.readable_file(table, "relay", "ca_file"),
            mta_sts_port=self.integer(table, "relay", "mta_sts_port", 443, 1, 65535),
            tls_report_interval=self.report_interval(table),
        )

    def report_interval(self, table: dict) -> float:
        interval = self.duration(table, "relay", "tls_report_interval", 86400.0)
        if not 1 <= interval <= 86400 or 86400 % interval:
            raise self.fail("relay.tls_report_interval", table.get("tls_report_interval"),
                            'a duration that divides a day, such as "1d" (the default), "1h" or "10s"')
        return interval

    def readable_file(self, table: dict, key: str, name: str) -> Path | None:
        """An optional file key, resolved against the config's folder; it must exist now."""
        value = self.string(table, key, name)
        if value is None:
            return None
        path = self.resolve(value)
        if not path.is_file():
            raise ConfigError(f"{self.path}: {key}.{name}: {path} is not a readable file")
        return path

    def dkim(self, value: Any) -> tuple[DkimConfig, ...]:
        """[[dkim]] entries: a signing key per domain (keys made by `mailhost dkim keygen` need none)."""
        if not isinstance(value, list):
            raise self.fail("dkim", value, "[[dkim]] tables")
        entries = []
        for index, raw in enumerate(value):
            key = f"dkim[{index}]"
            table = self.check_table(raw, key, {"domain", "selector", "key_file", "algorithm"})
            domain = self.string(table, key, "domain")
            if domain is None or not _is_domain(domain):
                raise self.fail(f"{key}.domain", domain, "a domain such as example.org")
            selector = self.string(table, key, "selector")
            if selector is None or not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", selector):
                raise self.fail(f"{key}.selector", selector, "a selector such as s2026")
            key_file = self.string(table, key, "key_file")
            if key_file is None or not self.resolve(key_file).is_file():
                raise self.fail(f"{key}.key_file", key_file, "a readable private key file")
            algorithm = self.choice(table, key, "algorithm", "rsa-sha256", ("rsa-sha256", "ed25519-sha256"))
            entries.append(DkimConfig(domain.lower(), selector, self.resolve(key_file), algorithm))
        return tuple(entries)

    def throttles(self, value: Any) -> tuple[ThrottleRule, ...]:
        """[[throttle]] entries first (they win a match), then the built-in provider defaults they do not replace."""
        if not isinstance(value, list):
            raise self.fail("throttle", value, "[[throttle]] tables")
        rules = []
        for index, raw in enumerate(value):
            key = f"throttle[{index}]"
            table = self.check_table(raw, key, {"name", "mx", "connections", "rate", "floor"})
            name = self.string(table, key, "name")
            if name is None:
                raise self.fail(f"{key}.name", None, "a group name such as google")
            mx = table.get("mx")
            if not isinstance(mx, list) or not mx or not all(isinstance(d, str) and _is_domain(d) for d in mx):
                raise self.fail(f"{key}.mx", mx, 'a list of MX host domains such as ["google.com"]')
            rate = self.integer(table, key, "rate", 600, 0, 10**7)
            rules.append(ThrottleRule(
                name, tuple(d.lower() for d in mx), self.integer(table, key, "connections", 10, 1, 10000),
                float(rate), float(self.integer(table, key, "floor", min(10, rate), 0, 10**7)),
            ))
        names = {r.name for r in rules}
        return tuple(rules) + tuple(r for r in DEFAULT_RULES if r.name not in names)

    def nameserver(self, value: Any) -> tuple[str, int]:
        allowed = 'an address with optional port such as "127.0.0.1:5353" or "[::1]:53"'
        if not isinstance(value, str):
            raise self.fail("relay.nameservers", value, allowed)
        match = re.match(r"^\[([0-9a-fA-F:.]+)\](?::(\d+))?$", value) or re.match(r"^([0-9.]+)(?::(\d+))?$", value)
        try:
            if not match:
                raise ValueError(value)
            address = str(ipaddress.ip_address(match.group(1)))
            port = int(match.group(2) or 53)
            if not 1 <= port <= 65535:
                raise ValueError(port)
        except ValueError:
            raise self.fail("relay.nameservers", value, allowed) from None
        return address, port

    def smarthost(self, raw: Any, key: str) -> SmartHostConfig:
        table = self.check_table(raw, key, {"host", "port", "tls", "username", "password_file", "ca_file"})
        host = self.string(table, key, "host")
        if host is None:
            raise self.fail(f"{key}.host", None, "a host name or address")
        password_file = self.string(table, key, "password_file")
        username = self.string(table, key, "username")
        if (username is None) != (password_file is None):
            raise ConfigError(f"{self.path}: {key}: give both username and password_file, or neither")
        for name in ("password_file", "ca_file"):
            value = table.get(name)
            if isinstance(value, str) and value and not self.resolve(value).is_file():
                raise ConfigError(f"{self.path}: {key}.{name}: {self.resolve(value)} is not a readable file")
        return SmartHostConfig(
            host=host,
            port=self.integer(table, key, "port", 587, 1, 65535),
            tls=self.choice(table, key, "tls", "starttls", SMARTHOST_TLS),
            username=username,
            password_file=self.resolve(password_file) if password_file else None,
            ca_file=self.resolve(ca_file) if (ca_file := self.string(table, key, "ca_file")) else None,
        )

    def queue(self, table: dict) -> QueueConfig:
        d = QueueConfig()
        retry = table.get("retry")
        if retry is None:
            steps = d.retry
        else:
            if not isinstance(retry, list) or not retry:
                raise self.fail("queue.retry", retry, 'a list of durations such as ["1m", "5m"]')
            steps = tuple(self.duration({"retry": r}, "queue", "retry", 0.0) for r in retry)
            if any(s <= 0 for s in steps):
                raise self.fail("queue.retry", retry, "durations longer than 0")
        lifetime = self.duration(table, "queue", "lifetime", d.lifetime)
        if lifetime <= 0:
            raise self.fail("queue.lifetime", table.get("lifetime"), "a duration longer than 0")
        return QueueConfig(
            steps, lifetime, self.duration(table, "queue", "delay_warning", d.delay_warning),
            concurrency=self.integer(table, "queue", "concurrency", d.concurrency, 1, 10000),
            per_destination=self.integer(table, "queue", "per_destination", d.per_destination, 1, 1000),
            max_attempts=self.integer(table, "queue", "max_attempts", d.max_attempts, 0, 10000),
            marketing_lifetime=self._positive(table, "marketing_lifetime", d.marketing_lifetime),
        )

    def _positive(self, table: dict, name: str, default: float) -> float:
        value = self.duration(table, "queue", name, default)
        if value <= 0:
            raise self.fail(f"queue.{name}", table.get(name), "a duration longer than 0")
        return value


class _AnyKey(set):
    """Alias tables accept any key; their names are checked one by one."""

    def __contains__(self, item: object) -> bool:
        return True


def _is_domain(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lab) for lab in labels)


def _is_local_target(name: str) -> bool:
    return bool(name) and not any(c in name for c in "@/\0") and name not in (".", "..")


def _check_endpoint(reader: _Reader, key: str, description: str) -> None:
    """What the daemon will listen on, checked now: twistd would only fail later, with a traceback.

    Only the kinds mailhost's listeners take (they bind at once, before twistd drops root), and
    for the TCP kinds a port from 1 to 65535 (Twisted's parser takes any integer; bind() does not)."""
    from twisted.internet import endpoints, reactor

    example = 'a Twisted server endpoint such as "tcp:2525:interface=127.0.0.1"'
    kinds = ("tcp", "tcp6", "unix", "systemd", "ssl")
    kind, _, rest = description.partition(":")
    if kind.strip().lower() not in kinds:
        raise reader.fail(key, description, f"{example} (kinds: {', '.join(kinds)})")
    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise reader.fail(key, description, f"{example} ({e})") from None
    if kind.strip().lower() in ("tcp", "tcp6", "ssl"):
        fields = re.split(r"(?<!\\):", rest)
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        positional = [f for f in fields if "=" not in f]
        port = named.get("port", positional[0] if positional else "")
        if not (port.strip().isdigit() and 1 <= int(port) <= 65535):
            raise reader.fail(key, description, f"{example}, with a port from 1 to 65535")
