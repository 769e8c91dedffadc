"""Inbound authentication on the mx role: SPF, DKIM and DMARC, recorded in one
Authentication-Results header field (RFC 8601).

`evaluate()` does the DNS work (blocking; the daemon runs it on a thread) and
answers with an `AuthVerdict`: the header field value to add and each result.

- SPF (RFC 7208) with pyspf, for the MAIL FROM identity (postmaster@HELO for
  the null sender, RFC 7208 2.4) and for the HELO identity. pyspf's one DNS
  hook is the module global `spf.DNSLookup`; it is replaced by a dispatcher
  that uses the resolver of the evaluation running on the same thread (and
  pyspf's own lookup otherwise), so concurrent evaluations with different
  name servers do not meet.
- DKIM (RFC 6376) with dkimpy: every DKIM-Signature is verified, each gets
  its own `dkim=` result; key lookups go through our resolver.
- DMARC (RFC 7489): the policy record of the From domain, else of its
  organizational domain (the Public Suffix List); aligned SPF or aligned DKIM
  passes. The p= (sp= for a subdomain using its organizational domain's
  record) is reported when DMARC fails.

`strip_forged_results()` removes incoming Authentication-Results fields that
claim our authserv-id (RFC 8601 5), byte-exact otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

import dkim
import dkim.util
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# Best first: any passing signature wins; a temporary error may pass on retry,
# so it outranks the definite failures.
DKIM_ORDER = ("pass", "temperror", "fail", "permerror", "none")
POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class AuthVerdict:
    header: str               # the Authentication-Results field value (one line, no CR/LF)
    spf: str                  # the MAIL FROM identity's result: one of SPF_RESULTS
    dkim: str                 # best over all signatures: pass | fail | none | temperror | permerror
    dmarc: str                # pass | fail | none | temperror | permerror
    dmarc_policy: str | None  # p= (or sp=) of the From domain when DMARC failed, else None


@dataclass(frozen=True)
class _Result:
    """One resinfo of the header: method=result (comment) ptype.property=value ..."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()
    comment: str = ""
    domain: str = ""  # DKIM: the signing domain (d=), for DMARC alignment


class _TempError(Exception):
    """A DNS lookup failed in a way a retry may fix (SERVFAIL, timeout, no server)."""


# -- DNS --------------------------------------------------------------------------------------


def _make_resolver(nameservers: tuple[tuple[str, int], ...], timeout: float) -> dns.resolver.Resolver:
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    else:
        try:
            resolver = dns.resolver.Resolver()  # /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.resolver.Resolver(configure=False)  # no servers: every lookup is a temperror
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)
    return resolver


def _resolve(resolver: dns.resolver.Resolver, name: str, rdtype: str, lifetime: float | None = None) -> list[Any]:
    """The records of one type ([] for NXDOMAIN or no data); _TempError when the DNS cannot say."""
    try:
        answer = resolver.resolve(name, rdtype, search=False, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as error:  # timeout, SERVFAIL, no server, malformed reply
        raise _TempError(f"{name}/{rdtype}: {error}") from error
    return list(answer)


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    """Each TXT record with its character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    return [b"".join(record.strings) for record in _resolve(resolver, name, "TXT")]


# -- SPF (pyspf) ------------------------------------------------------------------------------

_spf_context = threading.local()
_PYSPF_LOOKUP = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...]; TempError when DNS fails."""
    resolver: dns.resolver.Resolver | None = getattr(_spf_context, "resolver", None)
    if resolver is None:  # somebody else's pyspf use in this process
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    try:
        records = _resolve(resolver, name, qtype, lifetime=min(timeout, resolver.lifetime))
    except _TempError as error:
        raise spf.TempError(f"DNS {error}") from None
    return [((name, qtype), _spf_value(qtype, record)) for record in records]


def _spf_value(qtype: str, record: Any) -> Any:
    if qtype in ("A", "AAAA"):
        return record.address
    if qtype == "MX":
        return (record.preference, record.exchange)
    if qtype == "PTR":
        return record.target.to_text(omit_final_dot=True)
    return record.strings  # TXT: pyspf joins the character-strings itself


spf.DNSLookup = _spf_lookup


@contextlib.contextmanager
def _spf_resolver(resolver: dns.resolver.Resolver) -> Iterator[None]:
    _spf_context.resolver = resolver
    try:
        yield
    finally:
        _spf_context.resolver = None


_LABEL = re.compile(r"[0-9A-Za-z_]([0-9A-Za-z_-]{0,61}[0-9A-Za-z_])?")


def _is_checkable_domain(domain: str) -> bool:
    """RFC 7208 4.3: a malformed or single-label domain (or an address literal) gives "none"
    without a lookup."""
    labels = domain.split(".")
    return (len(labels) >= 2 and len(domain) <= 253 and not labels[-1].isdigit()
            and all(_LABEL.fullmatch(label) for label in labels))


def _a_label(domain: str) -> str | None:
    """The ASCII form of a domain (lower case, no final dot); None when it has none."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("ascii").decode("ascii")
    except UnicodeEncodeError:
        try:
            return domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None


def _check_spf(client_ip: str, sender: str, helo: str, timeout: float) -> str:
    """check_host() for one identity (sender is local@domain)."""
    domain = _a_label(sender.rpartition("@")[2])
    if domain is None or not _is_checkable_domain(domain):
        return "none"
    local = sender.rpartition("@")[0] or "postmaster"
    # RFC 7208 4.6.4: the whole evaluation gets at least 20 s; each lookup `timeout`.
    try:
        query = spf.query(i=client_ip, s=f"{local}@{domain}", h=helo, timeout=timeout, querytime=max(20.0, timeout))
        result = query.check()[0]
    except Exception:  # pyspf tripping over a hostile record must not lose the message
        return "permerror"
    return result if result in SPF_RESULTS else "permerror"


# -- DKIM (dkimpy) ----------------------------------------------------------------------------


class _KeyLookup:
    """dkimpy's dnsfunc, remembering how the key lookup went (dkimpy folds all of it into False)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver
        self.outcome = "not asked"

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = _txt(self.resolver, name.decode("ascii", "replace").rstrip("."))
        except _TempError as error:
            self.outcome = "temperror"
            raise dkim.DnsTimeoutError(str(error)) from None
        if not records:
            self.outcome = "no key"
            return None
        try:
            dkim.evaluate_pk(name, records[0])
        except Exception:  # dkimpy raises assorted errors on a malformed record
            self.outcome = "bad key"
        else:
            self.outcome = "found"
        return records[0]


def _tag(tags: dict[bytes, bytes], name: bytes) -> str:
    return re.sub(r"\s+", "", tags.get(name, b"").decode("utf-8", "replace"))


def _verify_signature(message: bytes, index: int, raw: bytes, resolver: dns.resolver.Resolver) -> _Result:
    try:
        tags = dkim.util.parse_tag_value(raw)
    except Exception:  # InvalidTagValueList and friends
        return _Result("dkim", "permerror")
    # header.b (RFC 6008) tells two signatures of one domain and selector apart.
    properties = [("header.d", _tag(tags, b"d")), ("header.s", _tag(tags, b"s")), ("header.b", _tag(tags, b"b")[:8])]

    def result(value: str) -> _Result:
        return _Result("dkim", value, tuple(p for p in properties if p[1]), domain=_tag(tags, b"d"))

    try:
        dkim.validate_signature_fields(tags)
    except Exception:  # missing tags, unknown algorithm, expired: not a verifiable signature
        return result("permerror")
    lookup = _KeyLookup(resolver)
    try:
        verified = dkim.DKIM(message).verify(idx=index, dnsfunc=lookup)
    except dkim.ValidationError:  # the body hash does not match
        return result("fail")
    except Exception:  # dkimpy raises assorted errors on hostile input; the message is still delivered
        return result("permerror")
    if verified:
        return result("pass")
    return result({"temperror": "temperror", "no key": "permerror", "bad key": "permerror"}.get(lookup.outcome, "fail"))


def _check_dkim(message: bytes, resolver: dns.resolver.Resolver) -> list[_Result]:
    try:
        headers = dkim.DKIM(message).headers  # dkimpy's own view, so the indexes match verify(idx)
    except Exception:  # a header block dkimpy cannot parse: no signature of it can verify
        signed = any(name.lower() == "dkim-signature" for name, _ in _fields_named(message))
        return [_Result("dkim", "permerror" if signed else "none")]
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return [_Result("dkim", "none")]
    return [_verify_signature(message, index, raw, resolver) for index, raw in enumerate(signatures)]


# -- DMARC ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DmarcRecord:
    policy: str           # what applies to this From domain: p=, or sp= for a subdomain
    strict_dkim: bool     # adkim=s
    strict_spf: bool      # aspf=s


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package; loading takes ~0.1 s, once


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: one label more than the public suffix (the domain itself when it is one)."""
    return _public_suffixes().privatesuffix(domain) or domain


def _aligned(domain: str, from_domain: str, strict: bool) -> bool:
    if strict:
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def _dmarc_records(resolver: dns.resolver.Resolver, domain: str) -> list[str]:
    records = (r.decode("utf-8", "replace") for r in _txt(resolver, f"_dmarc.{domain}"))
    return [r for r in records if re.match(r"v\s*=\s*DMARC1\s*(;|$)", r)]


def _parse_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _dmarc_record(resolver: dns.resolver.Resolver, from_domain: str) -> _DmarcRecord | None:
    """RFC 7489 6.6.3 policy discovery; None when no DMARC applies. _TempError on DNS failure."""
    records = _dmarc_records(resolver, from_domain)
    organizational = organizational_domain(from_domain)
    subdomain = False
    if not records and organizational != from_domain:
        records, subdomain = _dmarc_records(resolver, organizational), True
    if len(records) != 1:
        return None
    tags = _parse_tags(records[0])
    policy, sub_policy = tags.get("p", "").lower(), tags.get("sp", "").lower()
    if policy not in POLICIES or (sub_policy and sub_policy not in POLICIES):
        if not tags.get("rua"):
            return None
        policy, sub_policy = "none", ""  # 6.6.3 step 6: with reports asked for, act as p=none
    return _DmarcRecord(
        policy=(sub_policy or policy) if subdomain else policy,
        strict_dkim=tags.get("adkim", "r").lower() == "s",
        strict_spf=tags.get("aspf", "r").lower() == "s",
    )


def _from_domain(message: bytes) -> str | None:
    """The one RFC5322.From domain; None when there is none, or several (RFC 7489 6.6.1)."""
    values = [_unfold(value) for name, value in _fields_named(message) if name.lower() == "from"]
    if len(values) != 1:
        return None
    domains = {_a_label(address.rpartition("@")[2]) for _, address in getaddresses(values) if "@" in address}
    if len(domains) != 1:
        return None
    domain = domains.pop()
    return domain if domain and _is_checkable_domain(domain) else None


def _check_dmarc(
    message: bytes, resolver: dns.resolver.Resolver, spf_result: str, spf_domain: str | None, dkim_results: list[_Result]
) -> tuple[_Result, str | None]:
    from_domain = _from_domain(message)
    if from_domain is None:
        return _Result("dmarc", "permerror", comment="no single From domain"), None
    header_from = (("header.from", from_domain),)
    try:
        record = _dmarc_record(resolver, from_domain)
    except _TempError:
        return _Result("dmarc", "temperror", header_from), None
    if record is None:
        return _Result("dmarc", "none", header_from), None
    spf_aligned = spf_domain is not None and _aligned(spf_domain, from_domain, record.strict_spf)
    signers = [(r.result, _a_label(r.domain)) for r in dkim_results if r.domain]
    dkim_aligned = [result for result, domain in signers if domain and _aligned(domain, from_domain, record.strict_dkim)]
    if (spf_aligned and spf_result == "pass") or "pass" in dkim_aligned:
        return _Result("dmarc", "pass", header_from), None
    if (spf_aligned and spf_result == "temperror") or "temperror" in dkim_aligned:
        return _Result("dmarc", "temperror", header_from), None  # a retry may pass: not a reason to reject
    return _Result("dmarc", "fail", header_from, comment=f"p={record.policy}"), record.policy


# -- the header -------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045 token
_ADDRESS = re.compile(  # RFC 5321 local-part (dot-string or quoted-string) @ domain
    r"""([!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+(\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+)*|"([^"\\]|\\.)*")@[0-9A-Za-z_\-.]+"""
)


def _pvalue(value: str) -> str:
    """RFC 8601 pvalue: a token or local-part@domain as it is, anything else a quoted-string."""
    value = re.sub(r"[\x00-\x1f\x7f]", "", value)  # never a CR or LF in a header we write
    if _TOKEN.fullmatch(value) or _ADDRESS.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + re.sub(r"[()\\\x00-\x1f\x7f]", "", text) + ")"


def _resinfo(result: _Result) -> str:
    parts = [f"{result.method}={result.result}"]
    if result.comment:
        parts.append(_comment(result.comment))
    parts.extend(f"{name}={_pvalue(value)}" for name, value in result.properties)
    return " ".join(parts)


def _header(hostname: str, results: list[_Result]) -> str:
    return "; ".join([_pvalue(hostname), *(_resinfo(r) for r in results)])


# -- evaluate ---------------------------------------------------------------------------------


def _envelope_sender(mail_from: str, helo: str) -> str:
    """The MAIL FROM identity: the address, or postmaster@HELO for the null sender (RFC 7208 2.4)."""
    address = mail_from.strip().removeprefix("<").removesuffix(">")
    return address if address else f"postmaster@{helo}"


def evaluate(
    *,
    hostname: str,
    client_ip: str,
    helo: str,
    mail_from: str,
    message: bytes,
    nameservers: tuple[tuple[str, int], ...] = (),
    timeout: float = 5.0,
) -> AuthVerdict:
    """SPF, DKIM and DMARC for one received message (blocking: DNS). client_ip must be an IP address."""
    client_ip = str(ipaddress.ip_address(client_ip))  # ValueError for the caller's mistake, not an SPF result
    resolver = _make_resolver(nameservers, timeout)
    sender = _envelope_sender(mail_from, helo)
    helo_domain = helo.strip().rstrip(".")
    with _spf_resolver(resolver):
        spf_result = _check_spf(client_ip, sender, helo_domain, timeout)
        if sender == f"postmaster@{helo}":
            helo_result = spf_result  # the same check_host(); ask the DNS once
        else:
            helo_result = _check_spf(client_ip, f"postmaster@{helo_domain}", helo_domain, timeout)
    dkim_results = _check_dkim(message, resolver)
    spf_domain = _a_label(sender.rpartition("@")[2])
    dmarc, policy = _check_dmarc(message, resolver, spf_result, spf_domain, dkim_results)
    results = [
        _Result("spf", spf_result, (("smtp.mailfrom", sender),)),
        _Result("spf", helo_result, (("smtp.helo", helo),)),
        *dkim_results,
        dmarc,
    ]
    return AuthVerdict(
        header=_header(hostname, results),
        spf=spf_result,
        dkim=min((r.result for r in dkim_results), key=DKIM_ORDER.index),
        dmarc=dmarc.result,
        dmarc_policy=policy,
    )


# -- the raw header block ---------------------------------------------------------------------


def _header_fields(message: bytes) -> tuple[list[bytes], int]:
    """The header block's fields, each with its continuation lines and line endings (exact
    bytes), and the offset of what follows (the empty line and the body)."""
    fields: list[bytes] = []
    position = 0
    while position < len(message):
        end = message.find(b"\n", position)
        end = len(message) if end < 0 else end + 1
        line = message[position:end]
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
        position = end
    return fields, position


def _fields_named(message: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, raw value) for each header field that has a name."""
    for field in _header_fields(message)[0]:
        name, colon, value = field.partition(b":")
        if colon:
            yield name.rstrip(b" \t").decode("ascii", "replace"), value


def _unfold(value: bytes) -> str:
    return re.sub(r"\r?\n", "", value.decode("utf-8", "replace")).strip()


def _skip_cfws(text: str, position: int) -> int:
    """Past white space and (nested) comments."""
    depth = 0
    while position < len(text):
        char = text[position]
        if char == "\\" and depth:
            position += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and char not in " \t":
            break
        position += 1
    return position


def _authserv_id(value: bytes) -> str:
    """The authserv-id an Authentication-Results value starts with (RFC 8601 2.2)."""
    text = _unfold(value)
    position = _skip_cfws(text, 0)
    if text[position : position + 1] == '"':
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text[position:])
        return re.sub(r"\\(.)", r"\1", match.group(1)) if match else ""
    match = re.match(r"[^\s;()]*", text[position:])
    return match.group(0) if match else ""


def _claims(field: bytes, authserv_id: str) -> bool:
    """Whether a raw header field is an Authentication-Results field of that authserv-id."""
    name, colon, value = field.partition(b":")
    return (bool(colon) and name.rstrip(b" \t").lower() == b"authentication-results"
            and _authserv_id(value).rstrip(".").lower() == authserv_id)


def strip_forged_results(message: bytes, hostname: str) -> bytes:
    """The message without the Authentication-Results fields that claim our authserv-id."""
    ours = hostname.strip().rstrip(".").lower()
    fields, end = _header_fields(message)
    kept = [field for field in fields if not _claims(field, ours)]
    if len(kept) == len(fields):
        return message
    return b"".join(kept) + message[end:]
