"""The HTTP API, /api/v1 on the `[http]` HTTPS listener: send mail with an API key and see
what happened to it. One module per job:

    keys.py          API keys: stored hashed in state_dir/apikeys.json (`mailhost apikey`)
    resource.py      routing, Bearer keys, scopes, rate limits (ratelimit.py), JSON answers
    errors.py        the JSON error body with a stable code
    compose.py       JSON or a raw message -> the message and envelope for the intake
    messages.py      POST /messages: through the one intake path (intake/), 202 once durable
    queue.py         GET /queue, GET /messages/{id}: from the spool and the event log on disk
    suppressions.py  GET/POST/DELETE /suppressions
    events.py        GET /events?since=: the events the webhooks carry
    openapi.py       GET /openapi.json
"""
