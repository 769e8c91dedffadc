"""The twistd plugin: `twistd -n mailhost --config etc/mailhost.toml`."""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["config", "c", "etc/mailhost.toml", "The mailhost configuration file (TOML)."]]


@implementer(IServiceMaker, IPlugin)
class MailhostServiceMaker:
    tapname = "mailhost"
    description = "A complete mail host: SMTP for your domains into Maildir."
    options = Options

    def makeService(self, options: Options):
        # Imported here so `twistd --help` stays fast and never fails on our code.
        from mailhost.service import make_service

        # options.parent: twistd's own options, to see whether it was told how to log.
        return make_service(options["config"], twistd_options=getattr(options, "parent", None))


serviceMaker = MailhostServiceMaker()
