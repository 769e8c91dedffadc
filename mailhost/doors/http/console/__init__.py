"""The web console under /console/ on the `[http]` HTTPS listener: server-rendered HTML, one
CSS file, charts drawn as SVG on the server, no script.

resource.py   the /console resource: dispatch, login required, CSRF checked on every POST
sessions.py   server-side sessions (random ids, expiry) and their CSRF tokens
login.py      /console/login and /console/logout (a mailhost user with the admin flag)
layout.py     the page frame, forms and tables (everything escaped)
charts.py     line and bar charts as inline SVG
dashboard.py  /console/: the mail flow (mailhost.feedback.traffic), complaint rates, paces, queue
queue.py      /console/queue: list with filters, a message's page, hold/release/flush/delete
suppressions.py  /console/suppressions: search, add, remove, CSV export
"""
