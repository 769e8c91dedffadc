"""The TOML configuration (mailhost.config): defaults, paths, and one-line errors."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from mailhost.config import MAX_WORKERS, ConfigError, load, parse_duration, usable_cores

PROJECT = Path(__file__).resolve().parent.parent

LISTENER = """
[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"
"""

DOMAIN = """
[[domain]]
name = "example.test"
"""

MINIMAL = LISTENER + DOMAIN


def write(tmp_path: Path, text: str | bytes, name: str = "etc/mailhost.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- defaults ------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)  # defaults must not depend on the working directory
    config = load(path)
    etc = tmp_path / "etc"
    var = (etc / "../var").resolve()

    assert config.server.hostname == socket.getfqdn().lower()
    assert config.server.state_dir == var
    assert config.server.tls_cert is None and config.server.tls_key is None
    assert config.server.workers == usable_cores() and config.server.workers_auto  # workers = "auto"

    assert [(lst.role, lst.endpoint) for lst in config.listeners] == [("mx", "tcp:2525:interface=127.0.0.1")]

    limits = config.limits
    assert limits.message_size == 36700160
    assert limits.recipients == 100
    assert limits.command_timeout == 300
    assert limits.data_timeout == 600
    assert limits.connections_per_ip == 20
    assert limits.auth_failures == 3
    assert limits.greet_pause == 1
    assert limits.tls_handshake_timeout == 30
    assert limits.session_timeout == 1800
    assert limits.junk_commands == 100
    assert limits.connections == 1000

    (domain,) = config.domains
    assert domain.name == "example.test"
    assert domain.maildir == var / "mail" / "example.test"
    assert domain.users.is_absolute()
    assert domain.catch_all is None
    assert domain.aliases == {}

    relay = config.relay
    assert relay.networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert relay.mx_port == 25
    assert relay.nameservers == ()
    assert relay.tls == "opportunistic"
    assert relay.smarthosts == ()

    assert config.submission.hide_client is False

    queue = config.queue
    assert queue.retry == (60, 300, 900, 1800, 3600, 7200)
    assert queue.lifetime == 5 * 86400
    assert queue.delay_warning == 4 * 3600


@pytest.mark.parametrize("cores, expected", [({0}, 1), ({0, 1}, 2), ({1, 3, 5}, 3), (set(range(200)), MAX_WORKERS)])
def test_workers_auto_is_one_process_per_usable_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     cores: set[int], expected: int) -> None:
    # The cores this process may run on (taskset, cpusets), not all the machine has.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: cores)
    for text in ("", "[server]\nworkers = 'auto'\n"):
        server = load(write(tmp_path, text + MINIMAL)).server
        assert (server.workers, server.workers_auto) == (expected, True)


def test_workers_as_a_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for number in (1, 3, MAX_WORKERS):
        server = load(write(tmp_path, f"[server]\nworkers = {number}\n" + MINIMAL)).server
        assert (server.workers, server.workers_auto) == (number, False)


def test_the_example_configuration_loads() -> None:
    config = load(PROJECT / "etc" / "mailhost.toml")
    assert config.server.state_dir == PROJECT / "var"
    assert config.domain("example.test") is not None


def test_submission_roles_and_hide_client(tmp_path: Path) -> None:
    listeners = "".join(
        f'[[listener]]\nrole = "{role}"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
        for role, port in (("mx", 2525), ("submission", 5870), ("submissions", 4650))
    )
    config = load(write(tmp_path, listeners + DOMAIN + "[submission]\nhide_client = true\n"))
    assert [lst.role for lst in config.listeners] == ["mx", "submission", "submissions"]
    assert config.submission.hide_client is True


def test_domain_lookup_is_case_insensitive(tmp_path: Path) -> None:
    config = load(write(tmp_path, LISTENER + '[[domain]]\nname = "Example.TEST"\n'))
    assert config.domains[0].name == "example.test"
    assert config.domain("EXAMPLE.test") is config.domains[0]
    assert config.domain("other.test") is None


# --- relative paths --------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    (etc / "tls" / "cert.pem").write_text("not checked by load\n")
    (etc / "tls" / "key.pem").write_text("not checked by load\n")
    (etc / "smarthost.pw").write_text("secret\n")
    write(
        tmp_path,
        f"""
[server]
hostname = "Mail.Example.TEST"
state_dir = "../var"
tls_cert = "tls/cert.pem"
tls_key = "./tls/key.pem"
{LISTENER}
[[domain]]
name = "example.test"
maildir = "../var/mail/example.test"
users = "users"
[[domain]]
name = "other.test"
maildir = "{tmp_path}/absolute/mail"
[[relay.smarthost]]
host = "smtp.provider.test"
username = "acct"
password_file = "smarthost.pw"
""",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (etc / "mailhost.toml", Path("../etc/mailhost.toml")):  # absolute and relative --config
        config = load(given)
        assert config.server.hostname == "mail.example.test"
        assert config.server.state_dir == tmp_path / "var"
        assert config.server.tls_cert == etc / "tls" / "cert.pem"
        assert config.server.tls_key == etc / "tls" / "key.pem"
        example, other = config.domains
        assert example.maildir == tmp_path / "var" / "mail" / "example.test"
        assert example.users == etc / "users"
        assert other.maildir == tmp_path / "absolute" / "mail"
        assert other.users.is_absolute()
        assert config.relay.smarthosts[0].password_file == etc / "smarthost.pw"


# --- mistakes --------------------------------------------------------------------

# (id, config text, substrings the one-line message must contain besides the file name)
MISTAKES = [
    # unknown keys
    ("unknown top-level key", MINIMAL + "bogus = 1\n", ["bogus"]),
    ("unknown top-level table", MINIMAL + "[serverr]\nhostname = 'x'\n", ["serverr"]),
    ("unknown key in server", "[server]\nhostnme = 'x'\n" + MINIMAL, ["server.hostnme"]),
    ("unknown key in limits", "[limits]\ngreet_pauze = '1s'\n" + MINIMAL, ["limits.greet_pauze"]),
    ("unknown key in listener", LISTENER + "port = 25\n" + DOMAIN, ["listener", "port"]),
    ("unknown key in domain", LISTENER + DOMAIN + "catchall = 'alice'\n", ["domain", "catchall"]),
    ("unknown key in relay", MINIMAL + "[relay]\nnetwork = ['10.0.0.0/8']\n", ["relay.network"]),
    ("unknown key in queue", MINIMAL + "[queue]\nlife = '5d'\n", ["queue.life"]),
    ("unknown key in submission", MINIMAL + "[submission]\nhide = true\n", ["submission.hide"]),
    ("hide_client not a boolean", MINIMAL + "[submission]\nhide_client = 'yes'\n", ["submission.hide_client"]),
    ("hide_client a number", MINIMAL + "[submission]\nhide_client = 1\n", ["submission.hide_client"]),
    (
        "unknown key in smarthost",
        MINIMAL + "[[relay.smarthost]]\nhost = 'smtp.provider.test'\npasswd = 'x'\n",
        ["smarthost", "passwd"],
    ),
    ("unknown key with a newline in its name", '"bad\\nkey" = 1\n' + MINIMAL, ["bad"]),
    # wrong types
    ("server not a table", 'server = "mail.example.test"\n' + MINIMAL, ["server"]),
    ("hostname not a string", "[server]\nhostname = 5\n" + MINIMAL, ["server.hostname"]),
    ("state_dir not a string", "[server]\nstate_dir = ['var']\n" + MINIMAL, ["server.state_dir"]),
    ("workers a string", "[server]\nworkers = '2'\n" + MINIMAL, ["server.workers", "1 to 64", '"auto"']),
    ("workers a word", "[server]\nworkers = 'all'\n" + MINIMAL, ["server.workers", "'all'", '"auto"']),
    ("workers Auto", "[server]\nworkers = 'Auto'\n" + MINIMAL, ["server.workers"]),
    ("workers true", "[server]\nworkers = true\n" + MINIMAL, ["server.workers"]),
    ("message_size a string", "[limits]\nmessage_size = 'big'\n" + MINIMAL, ["limits.message_size"]),
    ("message_size a float", "[limits]\nmessage_size = 1.5e6\n" + MINIMAL, ["limits.message_size"]),
    ("recipients a boolean", "[limits]\nrecipients = true\n" + MINIMAL, ["limits.recipients"]),
    ("listener not an array of tables", 'listener = "tcp:25"\n' + DOMAIN, ["listener"]),
    ("endpoint not a string", '[[listener]]\nrole = "mx"\nendpoint = 2525\n' + DOMAIN, ["listener", "endpoint"]),
    ("domain name not a string", LISTENER + "[[domain]]\nname = 5\n", ["domain", "name"]),
    ("catch_all not a string", LISTENER + DOMAIN + "catch_all = ['alice']\n", ["domain", "catch_all"]),
    ("aliases not a table", LISTENER + DOMAIN + "aliases = ['alice']\n", ["domain", "aliases"]),
    ("alias targets not a list", LISTENER + DOMAIN + "[domain.aliases]\nsales = 5\n", ["aliases", "sales"]),
    ("networks a string", MINIMAL + "[relay]\nnetworks = '127.0.0.0/8'\n", ["relay.networks"]),
    ("network a number", MINIMAL + "[relay]\nnetworks = [5]\n", ["relay.networks"]),
    ("mx_port a string", MINIMAL + "[relay]\nmx_port = '25'\n", ["relay.mx_port"]),
    ("nameservers a string", MINIMAL + "[relay]\nnameservers = '127.0.0.1'\n", ["relay.nameservers"]),
    ("smarthost port a string", MINIMAL + "[[relay.smarthost]]\nhost = 'h.test'\nport = '587'\n", ["smarthost", "port"]),
    ("retry a string", MINIMAL + "[queue]\nretry = '1m'\n", ["queue.retry"]),
    # bad values
    ("message_size too small", "[limits]\nmessage_size = 10\n" + MINIMAL, ["limits.message_size"]),
    ("recipients zero", "[limits]\nrecipients = 0\n" + MINIMAL, ["limits.recipients"]),
    ("workers zero", "[server]\nworkers = 0\n" + MINIMAL, ["server.workers"]),
    ("workers too many", "[server]\nworkers = 65\n" + MINIMAL, ["server.workers"]),
    ("command_timeout zero", "[limits]\ncommand_timeout = 0\n" + MINIMAL, ["limits.command_timeout"]),
    ("mx_port out of range", MINIMAL + "[relay]\nmx_port = 70000\n", ["relay.mx_port"]),
    ("relay tls unknown", MINIMAL + "[relay]\ntls = 'sometimes'\n", ["relay.tls"]),
    ("smarthost without host", MINIMAL + "[[relay.smarthost]]\nport = 587\n", ["smarthost", "host"]),
    ("smarthost tls unknown", MINIMAL + "[[relay.smarthost]]\nhost = 'h.test'\ntls = 'ssl'\n", ["smarthost", "tls"]),
    (
        "smarthost username without password_file",
        MINIMAL + "[[relay.smarthost]]\nhost = 'h.test'\nusername = 'acct'\n",
        ["smarthost"],
    ),
    ("nameserver a name", MINIMAL + "[relay]\nnameservers = ['localhost:53']\n", ["relay.nameservers"]),
    ("nameserver bad port", MINIMAL + "[relay]\nnameservers = ['127.0.0.1:99999']\n", ["relay.nameservers"]),
    ("domain name with a space", LISTENER + "[[domain]]\nname = 'exa mple.test'\n", ["domain", "name"]),
    ("catch_all with a slash", LISTENER + DOMAIN + "catch_all = 'a/b'\n", ["domain", "catch_all"]),
    ("alias name with @", LISTENER + DOMAIN + '[domain.aliases]\n"a@b" = ["alice"]\n', ["aliases"]),
    ("alias target not an address", LISTENER + DOMAIN + "[domain.aliases]\nsales = ['bob@']\n", ["aliases", "sales"]),
    (
        "hostname with a line break",
        '[server]\nhostname = "mail.example.test\\r\\n250 injected"\n' + MINIMAL,
        ["server.hostname"],
    ),
    ("alias target ..", LISTENER + DOMAIN + "[domain.aliases]\nsales = ['..']\n", ["aliases", "sales"]),
    # bad durations
    ("greet_pause in words", "[limits]\ngreet_pause = '1 second'\n" + MINIMAL, ["limits.greet_pause"]),
    ("greet_pause fractional", "[limits]\ngreet_pause = '1.5s'\n" + MINIMAL, ["limits.greet_pause"]),
    ("greet_pause negative", "[limits]\ngreet_pause = '-1s'\n" + MINIMAL, ["limits.greet_pause"]),
    ("greet_pause without unit", "[limits]\ngreet_pause = '5'\n" + MINIMAL, ["limits.greet_pause"]),
    ("data_timeout zero", "[limits]\ndata_timeout = '0s'\n" + MINIMAL, ["limits.data_timeout"]),
    ("tls_handshake_timeout zero", "[limits]\ntls_handshake_timeout = 0\n" + MINIMAL, ["limits.tls_handshake_timeout"]),
    ("tls_handshake_timeout in words", "[limits]\ntls_handshake_timeout = 'soon'\n" + MINIMAL,
     ["limits.tls_handshake_timeout"]),
    ("session_timeout zero", "[limits]\nsession_timeout = '0s'\n" + MINIMAL, ["limits.session_timeout"]),
    ("session_timeout a float", "[limits]\nsession_timeout = 1.5\n" + MINIMAL, ["limits.session_timeout"]),
    ("junk_commands zero", "[limits]\njunk_commands = 0\n" + MINIMAL, ["limits.junk_commands"]),
    ("junk_commands a string", "[limits]\njunk_commands = '100'\n" + MINIMAL, ["limits.junk_commands"]),
    ("connections zero", "[limits]\nconnections = 0\n" + MINIMAL, ["limits.connections"]),
    ("connections negative", "[limits]\nconnections = -5\n" + MINIMAL, ["limits.connections"]),
    ("lifetime unknown unit", MINIMAL + "[queue]\nlifetime = '5w'\n", ["queue.lifetime"]),
    ("lifetime zero", MINIMAL + "[queue]\nlifetime = '0'\n", ["queue.lifetime"]),
    ("delay_warning a number", MINIMAL + "[queue]\ndelay_warning = 4\n", ["queue.delay_warning"]),
    ("retry step bad", MINIMAL + "[queue]\nretry = ['1m', 'soon']\n", ["queue.retry"]),
    ("retry empty", MINIMAL + "[queue]\nretry = []\n", ["queue.retry"]),
    ("retry step zero", MINIMAL + "[queue]\nretry = ['1m', '0']\n", ["queue.retry"]),
    # roles and endpoints
    ("bad role", '[[listener]]\nrole = "smtp"\nendpoint = "tcp:2525"\n' + DOMAIN, ["listener", "role"]),
    ("missing role", '[[listener]]\nendpoint = "tcp:2525"\n' + DOMAIN, ["listener", "role"]),
    ("missing endpoint", '[[listener]]\nrole = "mx"\n' + DOMAIN, ["listener", "endpoint"]),
    ("unknown endpoint type", '[[listener]]\nrole = "mx"\nendpoint = "nonsense:2525"\n' + DOMAIN, ["endpoint"]),
    ("endpoint port not a number", '[[listener]]\nrole = "mx"\nendpoint = "tcp:smtp"\n' + DOMAIN, ["endpoint"]),
    ("endpoint bad option", '[[listener]]\nrole = "mx"\nendpoint = "tcp:2525:bogus=1"\n' + DOMAIN, ["endpoint"]),
    ("endpoint empty", '[[listener]]\nrole = "mx"\nendpoint = ""\n' + DOMAIN, ["endpoint"]),
    (
        "submissions on a TLS endpoint",
        '[[listener]]\nrole = "submissions"\nendpoint = "ssl:4650:privateKey=key.pem"\n' + DOMAIN,
        ["listener[0].endpoint", "tcp:465"],
    ),
    (
        "ssl endpoint with a missing key file",
        '[[listener]]\nrole = "mx"\nendpoint = "ssl:4650:privateKey=nowhere/key.pem"\n' + DOMAIN,
        ["listener[0].endpoint"],
    ),
    # Passed check-config before, then failed in twistd with a traceback (bind(): port must be 0-65535).
    ("endpoint port too big", '[[listener]]\nrole = "mx"\nendpoint = "tcp:99999"\n' + DOMAIN,
     ["listener[0].endpoint", "99999", "1 to 65535"]),
    ("endpoint port as option too big", '[[listener]]\nrole = "mx"\nendpoint = "tcp:port=70000:interface=127.0.0.1"\n'
     + DOMAIN, ["listener[0].endpoint", "70000", "1 to 65535"]),
    ("endpoint port negative", '[[listener]]\nrole = "mx"\nendpoint = "tcp6:-25"\n' + DOMAIN, ["endpoint", "1 to 65535"]),
    ("endpoint port zero", '[[listener]]\nrole = "mx"\nendpoint = "tcp:0"\n' + DOMAIN, ["endpoint", "1 to 65535"]),
    ("endpoint kind mailhost does not listen on", '[[listener]]\nrole = "mx"\nendpoint = "stdio:"\n' + DOMAIN,
     ["listener[0].endpoint", "tcp, tcp6, unix, systemd"]),
    ("metrics endpoint port too big", MINIMAL + '[metrics]\nendpoint = "tcp:123456"\n', ["metrics.endpoint", "1 to 65535"]),
    (
        "second listener bad",
        LISTENER + '[[listener]]\nrole = "mx"\nendpoint = "tcp:x"\n' + DOMAIN,
        ["listener[1]", "endpoint"],
    ),
    # networks
    ("network prefix too long", MINIMAL + "[relay]\nnetworks = ['10.0.0.0/33']\n", ["relay.networks"]),
    ("network not an address", MINIMAL + "[relay]\nnetworks = ['intranet']\n", ["relay.networks"]),
    ("IPv6 network prefix too long", MINIMAL + "[relay]\nnetworks = ['::1/129']\n", ["relay.networks"]),
    # TLS pair
    ("tls_cert without tls_key", "[server]\ntls_cert = 'cert.pem'\n" + MINIMAL, ["tls_key"]),
    ("tls_key without tls_cert", "[server]\ntls_key = 'key.pem'\n" + MINIMAL, ["tls_cert"]),
    (
        "tls_cert missing file",
        "[server]\ntls_cert = 'nowhere/cert.pem'\ntls_key = 'nowhere/key.pem'\n" + MINIMAL,
        ["tls_cert"],
    ),
    # domains and listeners present or not
    ("duplicate domain", MINIMAL + DOMAIN, ["domain[1]", "name"]),
    ("duplicate domain in another case", MINIMAL + '[[domain]]\nname = "EXAMPLE.test"\n', ["domain[1]", "name"]),
    ("no listener", DOMAIN, ["listener"]),
    ("empty listener list", "listener = []\n" + DOMAIN, ["listener"]),
    ("no domain", LISTENER, ["domain"]),
    # the feedback loop's sections
    ("http endpoint bad", MINIMAL + "[http]\nendpoint = 'tcp:99999'\n", ["http.endpoint"]),
    ("public_url not https", MINIMAL + "[http]\npublic_url = 'http://mail.example.org'\n", ["http.public_url"]),
    ("marketing sender not an address", MINIMAL + "[unsubscribe]\nsenders = ['news']\n", ["unsubscribe.senders"]),
    ("feedback_id bad template", MINIMAL + "[unsubscribe]\nfeedback_id = '{nope}'\n", ["unsubscribe.feedback_id"]),
    ("fbl address a domain", MINIMAL + "[feedback]\naddresses = ['@example.test']\n", ["feedback.addresses"]),
    ("bounce_rule bad regex", MINIMAL + "[[bounce_rule]]\nmatch = '(x'\nclass = 'policy'\n", ["bounce_rule[0].match"]),
    ("bounce_rule typo class", MINIMAL + "[[bounce_rule]]\nmatch = 'x'\nclass = 'polcy'\n", ["bounce_rule[0].class"]),
    ("webhook no url", MINIMAL + "[[webhook]]\nformat = 'json'\n", ["webhook[0].url"]),
    ("webhook unknown event", MINIMAL + "[[webhook]]\nurl = 'http://127.0.0.1:1/h'\nevents = ['opened']\n",
     ["webhook[0].events"]),
    ("webhook missing secret", MINIMAL + "[[webhook]]\nurl = 'http://127.0.0.1:1/h'\nsecret_file = 'nope'\n",
     ["webhook[0].secret_file"]),
    ("max_attempts negative", MINIMAL + "[queue]\nmax_attempts = -1\n", ["queue.max_attempts"]),
    ("marketing_lifetime zero", MINIMAL + "[queue]\nmarketing_lifetime = '0'\n", ["queue.marketing_lifetime"]),
    # not TOML at all
    ("invalid TOML", "[[listener]\nrole = 'mx'\n", ["line 1"]),
    ("key given twice", LISTENER + 'role = "mx"\n' + DOMAIN, ["line"]),
    ("unterminated string", MINIMAL + '[server]\nhostname = "mail\n', ["line"]),
]


@pytest.mark.parametrize("text, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistakes_are_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    "content",
    [None, b"\xff\xfe[[listener]]\n"],
    ids=["missing file", "not UTF-8"],
)
def test_unreadable_file_is_one_line_naming_it(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "etc" / "mailhost.toml"
    if content is not None:
        write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message


def test_config_folder_given_as_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message


# --- durations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("0", 0), ("0s", 0), ("1s", 1), ("90s", 90), ("5m", 300), ("4h", 14400), ("5d", 432000), ("120m", 7200)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "5", "s", "m5", "1.5h", "-1s", "+1s", " 5m", "5m ", "5 m", "5w", "5ms", "1h30m", "5m\n", "\u0665m"],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "section, text, attribute, value",
    [
        ("limits", "greet_pause = '0s'", "greet_pause", 0),
        ("limits", "command_timeout = '5m'", "command_timeout", 300),
        ("limits", "data_timeout = 30", "data_timeout", 30),
        ("queue", "delay_warning = '0'", "delay_warning", 0),
        ("queue", "lifetime = '2d'", "lifetime", 172800),
        ("queue", "retry = ['30s', '2m']", "retry", (30, 120)),
    ],
)
def test_durations_in_the_config(tmp_path: Path, section: str, text: str, attribute: str, value: object) -> None:
    config = load(write(tmp_path, f"[{section}]\n{text}\n" + MINIMAL))
    assert getattr(getattr(config, section), attribute) == value


def test_feedback_loop_sections(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hook.secret").write_text("s3cret\n")
    config = load(write(tmp_path, MINIMAL + """
[http]
endpoint = "tcp:8443:interface=127.0.0.1"
public_url = "https://mail.example.test/"
[unsubscribe]
add_headers = true
senders = ["News@Example.test", "@campaigns.example.test"]
[feedback]
addresses = ["fbl@example.test"]
[[bounce_rule]]
match = "mailbox (is )?full"
class = "mailbox_full"
[[webhook]]
url = "https://crm.example.test/hooks/mail"
secret_file = "hook.secret"
events = ["bounced", "complained"]
format = "listmonk"
[queue]
max_attempts = 8
marketing_lifetime = "12h"
"""))
    assert config.http.public_url == "https://mail.example.test"
    assert config.unsubscribe.is_marketing("news@example.test")
    assert config.unsubscribe.is_marketing("<Offers@Campaigns.Example.test>")
    assert not config.unsubscribe.is_marketing("bob@example.test")
    assert config.feedback.addresses == ("fbl@example.test",)
    assert config.bounce_rules[0].category == "mailbox_full"
    assert config.bounce_rules[0].pattern.search("552 Mailbox FULL")
    hook = config.webhooks[0]
    assert hook.secret_file == tmp_path / "etc" / "hook.secret" and hook.events == ("bounced", "complained")
    assert config.queue.max_attempts == 8 and config.queue.marketing_lifetime == 43200.0


# --- MTA-STS, TLS-RPT, DANE ([relay]) --------------------------------------------


def test_relay_tls_policy_keys(tmp_path: Path) -> None:
    relay = load(write(tmp_path, MINIMAL)).relay
    assert (relay.mta_sts, relay.dane, relay.ca_file, relay.mta_sts_port, relay.tls_report_interval) == (
        True, False, None, 443, 86400.0)
    write(tmp_path, "-----BEGIN CERTIFICATE-----\n", "etc/ca.pem")
    relay = load(write(tmp_path, MINIMAL + '[relay]\nmta_sts = false\ndane = true\nca_file = "ca.pem"\n'
                       'mta_sts_port = 8443\ntls_report_interval = "1h"\n')).relay
    assert (relay.mta_sts, relay.dane, relay.ca_file, relay.mta_sts_port, relay.tls_report_interval) == (
        False, True, tmp_path / "etc" / "ca.pem", 8443, 3600.0)


@pytest.mark.parametrize("text, words", [
    ('dane = "yes"', ["relay.dane", "true or false"]),
    ('mta_sts = 1', ["relay.mta_sts"]),
    ('ca_file = "missing.pem"', ["relay.ca_file", "missing.pem"]),
    ('mta_sts_port = 0', ["relay.mta_sts_port"]),
    ('tls_report_interval = "7s"', ["relay.tls_report_interval", "divides a day"]),
    ('tls_report_interval = "2d"', ["relay.tls_report_interval"]),
])
def test_relay_tls_policy_errors_name_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, MINIMAL + f"[relay]\n{text}\n"))
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words)
