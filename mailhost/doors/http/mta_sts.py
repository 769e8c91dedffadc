"""/.well-known/mta-sts.txt: our own MTA-STS policy (RFC 8461 3.2), for every local domain.

A sender that finds `_mta-sts.DOMAIN` TXT fetches https://mta-sts.DOMAIN/.well-known/mta-sts.txt
(RFC 8461 3.3), so the Host header names the domain: the policy is served when DOMAIN is
one of ours and 404 otherwise (a name we do not receive for must not get a policy that
points at us). The body is the same for every domain: `[mta_sts]` mode, our MX names and
max_age. The TXT record's id is derived from the body (`policy_id`), so `mailhost dns`
prints a new id whenever the policy changes and senders fetch it again (RFC 8461 3.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.web import pages
from twisted.web.resource import IResource, Resource

from mailhost.config import Config
from mailhost.doors.http.site import Root

PATH = b"mta-sts.txt"
HOST_PREFIX = "mta-sts."


def mx_patterns(config: Config) -> tuple[str, ...]:
    """The MX names the policy allows: `[mta_sts] mx`, else the server's hostname."""
    return config.mta_sts.mx or (config.server.hostname.rstrip(".").lower(),)


def policy_text(config: Config) -> str:
    """The policy file (RFC 8461 3.2: key/value lines, CRLF-separated, version first)."""
    lines = ["version: STSv1", f"mode: {config.mta_sts.mode}"]
    lines += [f"mx: {mx}" for mx in mx_patterns(config)]
    lines.append(f"max_age: {config.mta_sts.max_age}")
    return "\r\n".join(lines) + "\r\n"


def policy_id(text: str) -> str:
    """The `id` of the `_mta-sts` TXT record for a policy (RFC 8461 3.1: 1 to 32 letters and
    digits): the start of its SHA-256, so it changes exactly when the policy does."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def policy_domain(host: bytes | None) -> str | None:
    """The domain an `mta-sts.DOMAIN[:port]` Host header asks about, lower case; None otherwise."""
    if not host:
        return None
    try:
        name = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if name.startswith("["):  # an IP literal: no domain
        return None
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    if not name.startswith(HOST_PREFIX) or len(name) > 253:
        return None
    return name[len(HOST_PREFIX):] or None


class MtaStsPolicy(Resource):
    """The policy file; `config` gives the running configuration (it follows a SIGHUP)."""

    isLeaf = True

    def __init__(self, config: Callable[[], Config]) -> None:
        super().__init__()
        self.config = config

    def render_GET(self, request: Any) -> bytes:
        config = self.config()
        domain = policy_domain(request.getHeader(b"host"))
        if request.postpath or domain is None or config.domain(domain) is None:
            return pages.notFound().render(request)
        request.setHeader(b"Content-Type", b"text/plain")  # RFC 8461 3.2
        return policy_text(config).encode("ascii")


def well_known(config: Callable[[], Config]) -> IResource:
    """/.well-known/: mta-sts.txt, 404 for the rest."""
    folder = Root()
    folder.putChild(PATH, MtaStsPolicy(config))
    return folder
