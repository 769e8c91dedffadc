"""Log observers for twistd's --logger option.

    twistd -n --logger=mailhost.logs.json_lines mailhost --config ...

writes one JSON object per event on stdout (twisted.logger's JSON format),
for log shippers; without --logger, twistd's text lines go to stdout or
--logfile. Either way each message's lines start with its queue id.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_lines() -> ILogObserver:
    """JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout)
