"""`mailhost dns DOMAIN`: every DNS record a local domain should publish, as zone-file lines.

Records are printed ready to paste into the domain's zone (absolute names, TXT values split
into strings of at most 255 octets, RFC 1035 3.3.14); what cannot be known from here (this
server's public addresses, its reverse DNS) is advice in `;` comments naming what to set.
"""

from __future__ import annotations

import sys

from mailhost.authn.dkim import DkimKeyError, domain_keys, public_record
from mailhost.config import Config
from mailhost.doors.http.mta_sts import policy_id, policy_text
from mailhost.feedback.unsubscribe import endpoint_port

TXT_STRING_LIMIT = 255  # octets in one <character-string> (RFC 1035 3.3)


def txt(name: str, value: str) -> str:
    """A TXT record line, the value split into quoted strings of at most 255 octets
    (receivers join them: RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    chunks = [value[i:i + TXT_STRING_LIMIT] for i in range(0, len(value), TXT_STRING_LIMIT)] or [""]
    strings = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    return f"{name}\tIN TXT\t{strings if len(chunks) == 1 else '( ' + strings + ' )'}"


def records(config: Config, domain: str, warn=lambda text: None) -> list[str]:
    """The lines `mailhost dns` prints for local domain `domain` (lower case)."""
    host = config.server.hostname.rstrip(".").lower()
    zone = f"{domain}."
    report_to = f"mailto:postmaster@{domain}"  # always accepted here (RFC 5321 4.5.1)
    lines = [f"; DNS records for {domain}, to publish in its zone (`mailhost dns {domain}`)", ""]

    lines += ["; MX (RFC 5321 5.1): mail for the domain comes to this server",
              f"{zone}\tIN MX\t10 {host}.", ""]

    lines += [f"; A/AAAA: {host} must resolve to this server's public addresses (in its own zone if not here):",
              f";   {host}.\tIN A\t<this server's public IPv4 address>",
              f";   {host}.\tIN AAAA\t<this server's public IPv6 address, if it has one>", ""]

    lines.append("; SPF (RFC 7208): the hosts named by the MX records send the domain's mail; nothing else may")
    if config.relay.smarthosts:
        lines.append("; (mail leaves through [[relay.smarthost]]: add the provider's include: before -all)")
    lines += [txt(zone, "v=spf1 mx -all"), ""]

    lines.append("; DKIM (RFC 6376): the public half of each signing key present")
    keys = domain_keys(config.server.state_dir, config.dkim, domain)
    for key in keys:
        if isinstance(key, DkimKeyError):
            warn(f"skipped a DKIM key: {key}")
            lines.append(f"; a key that cannot be used was skipped: {key}")
            continue
        lines.append(txt(f"{key.selector}._domainkey.{zone}", public_record(key)))
    if not keys:
        lines.append(f"; none yet: make one with `mailhost dkim keygen {domain} --selector s1`, then run this again")
    lines.append("")

    lines += ["; DMARC (RFC 7489): p=none to start: receivers refuse nothing for it, and send aggregate",
              f"; reports (rua) to postmaster@{domain} here, which show whether all the domain's mail passes",
              "; SPF or DKIM aligned; once they do, raise p to quarantine, then reject",
              txt(f"_dmarc.{zone}", f"v=DMARC1; p=none; rua={report_to}"), ""]

    lines.append(f"; MTA-STS (RFC 8461): senders fetch https://mta-sts.{domain}/.well-known/mta-sts.txt "
                 f"(mode {config.mta_sts.mode});")
    lines.append("; the id changes whenever the policy does: publish the new one after changing [mta_sts]")
    if config.http.endpoint is None:
        lines.append("; not served: no [http] endpoint is configured; add one to publish these")
        lines.append(";" + txt(f"_mta-sts.{zone}", f"v=STSv1; id={policy_id(policy_text(config))}"))
    else:
        port = endpoint_port(config.http.endpoint)
        lines.append(f"; mta-sts.{domain} must reach the [http] listener"
                     + ("" if port == 443 else f" on port 443 (it listens on {port}: forward 443 to it)")
                     + f" with a certificate valid for mta-sts.{domain}")
        lines += [txt(f"_mta-sts.{zone}", f"v=STSv1; id={policy_id(policy_text(config))}"),
                  f"mta-sts.{zone}\tIN CNAME\t{host}."]
    lines.append("")

    lines += ["; TLS-RPT (RFC 8460): where senders report failed TLS connections to this domain",
              txt(f"_smtp._tls.{zone}", f"v=TLSRPTv1; rua={report_to}"), ""]

    lines += [f"; PTR: the reverse DNS of each address {host} resolves to must name {host}",
              "; (set by whoever runs the address block; many receivers refuse mail from an address without it)"]
    return lines


def run(config: Config, domain: str) -> int:
    """Print the records of `domain`; raises LookupError naming it when it is not local."""
    found = config.domain(domain.rstrip("."))
    if found is None:
        raise LookupError(f"{domain} is not a local domain (local domains: {', '.join(d.name for d in config.domains)})")
    for line in records(config, found.name, warn=lambda text: sys.stderr.write(f"mailhost: {text}\n")):
        print(line)
    return 0
