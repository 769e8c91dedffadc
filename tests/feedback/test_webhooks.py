"""Webhooks (mailhost.feedback.webhooks): signed, in order, at least once, with backoff, on task.Clock."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

from mailhost.config import WebhookConfig
from mailhost.feedback.events import EventLog
from mailhost.feedback.webhooks import (BACKOFF_CAP, REFUSED_TRIES, Hook, Sender, WebhookService, backoff,
                                        listmonk_bounce, payload, prepare, sign, verify)

UUID = "9f86b50d-5711-41c8-ab03-bc91c43d711b"


def run_now(function, *args):
    return maybeDeferred(function, *args)


class Receiver:
    """A fake post(): answers from a script of codes (then 200), recording every request."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.requests = []

    def __call__(self, url, headers, body):
        self.requests.append((url, headers, body))
        code = self.codes.pop(0) if self.codes else 200
        if code == 0:
            return fail(ConnectionRefusedError("connection refused"))
        return succeed((code, b"ok"))

    def ids(self):
        return [json.loads(body)["id"] for _, _, body in self.requests]


def make_sender(tmp_path, receiver, clock=None, **config):
    events = EventLog(tmp_path / "events")
    hook = prepare((WebhookConfig("https://crm.example.org/hook", **config),))[0]
    return events, Sender(hook, events, run_now, clock or task.Clock(), post=receiver, rand=lambda: 1.0)


def test_a_receiver_verifies_the_signature_with_the_documented_recipe(tmp_path):
    (tmp_path / "secret").write_text("s3cret\n")
    receiver = Receiver()
    events, sender = make_sender(tmp_path, receiver, secret_file=tmp_path / "secret")
    sender.start()
    events.record("delivered", queue_id="q1", recipient="ann@example.com", sender="news@example.org")
    sender.nudge()
    [(_, headers, body)] = receiver.requests
    # The recipe in the README: t and v1 from the header, HMAC-SHA256(secret, t + "." + raw body).
    fields = dict(part.split("=", 1) for part in headers["X-Mailhost-Signature"].split(","))
    expected = hmac.new(b"s3cret", fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert verify(b"s3cret", body, headers["X-Mailhost-Signature"], now=int(fields["t"]))
    assert not verify(b"s3cret", body + b" ", headers["X-Mailhost-Signature"], now=int(fields["t"]))
    assert not verify(b"s3cret", body, headers["X-Mailhost-Signature"], now=int(fields["t"]) + 3600)
    assert headers["X-Mailhost-Event-Id"] == json.loads(body)["id"]


def test_no_secret_no_signature_header(tmp_path):
    receiver = Receiver()
    events, sender = make_sender(tmp_path, receiver)
    sender.start()
    events.record("delivered", recipient="ann@example.com")
    sender.nudge()
    assert "X-Mailhost-Signature" not in receiver.requests[0][1]


def test_backoff_doubles_up_to_a_cap_with_jitter():
    assert [backoff(n, lambda: 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(40, lambda: 1.0) == BACKOFF_CAP
    assert backoff(3, lambda: 0.0) == 2.0  # never below half


def test_a_down_receiver_holds_the_order_and_gets_everything_after_backoff(tmp_path):
    clock = task.Clock()
    receiver = Receiver(codes=[0, 503, 500])
    events, sender = make_sender(tmp_path, receiver, clock)
    sender.start()
    first = events.record("deferred", recipient="ann@example.com")["id"]
    second = events.record("delivered", recipient="ann@example.com")["id"]
    sender.nudge()
    assert receiver.ids() == [first]
    clock.advance(1.0)
    clock.advance(2.0)
    assert receiver.ids() == [first, first, first]
    assert json.loads(sender.path.read_text())["after"] < first  # nothing taken yet: the cursor stays
    clock.advance(4.0)
    assert receiver.ids() == [first, first, first, first, second]
    assert json.loads(sender.path.read_text())["after"] == second


def test_the_cursor_survives_a_restart_and_nothing_is_sent_twice(tmp_path):
    receiver = Receiver()
    events, sender = make_sender(tmp_path, receiver)
    sender.start()
    events.record("delivered", recipient="a@example.com")
    sender.nudge()
    sender.stop()
    later = events.record("bounced", recipient="b@example.com", status="5.1.1")["id"]
    again = Receiver()
    _, restarted = make_sender(tmp_path, again)
    restarted.start()
    assert again.ids() == [later]


def test_a_new_webhook_starts_with_what_happens_from_now_on(tmp_path):
    events = EventLog(tmp_path / "events")
    events.record("delivered", recipient="old@example.com")
    receiver = Receiver()
    _, sender = make_sender(tmp_path, receiver)
    sender.start()
    new = events.record("delivered", recipient="new@example.com")["id"]
    sender.nudge()
    assert receiver.ids() == [new]


def test_the_events_filter_passes_over_what_the_webhook_did_not_ask_for(tmp_path):
    receiver = Receiver()
    events, sender = make_sender(tmp_path, receiver, events=("bounced",))
    sender.start()
    events.record("delivered", recipient="a@example.com")
    bounced = events.record("bounced", recipient="b@example.com", status="5.1.1")["id"]
    last = events.record("deferred", recipient="c@example.com")["id"]
    sender.nudge()
    assert receiver.ids() == [bounced]
    assert json.loads(sender.path.read_text())["after"] == last


def test_a_request_the_receiver_refuses_for_good_is_skipped_after_a_few_tries(tmp_path):
    clock = task.Clock()
    receiver = Receiver(codes=[400] * REFUSED_TRIES)
    events, sender = make_sender(tmp_path, receiver, clock)
    sender.start()
    bad = events.record("delivered", recipient="a@example.com")["id"]
    good = events.record("delivered", recipient="b@example.com")["id"]
    sender.nudge()
    clock.pump([BACKOFF_CAP] * REFUSED_TRIES)
    assert receiver.ids() == [bad] * REFUSED_TRIES + [good]


def test_one_webhook_down_does_not_hold_up_another(tmp_path):
    clock = task.Clock()
    events = EventLog(tmp_path / "events")
    down, up = Receiver(codes=[0] * 100), Receiver()
    hooks = prepare((WebhookConfig("https://down.example.org/"), WebhookConfig("https://up.example.org/")))
    posts = {hooks[0].key: down, hooks[1].key: up}
    service = WebhookService(events, hooks, run_now, clock,
                             make_sender=lambda hook: Sender(hook, events, run_now, clock, post=posts[hook.key]))
    service.startService()
    one = events.record("delivered", recipient="a@example.com")["id"]
    clock.advance(1.0)  # the poll sees the log change
    assert up.ids() == [one] and down.ids() == [one]
    service.stopService()


def test_reload_keeps_the_place_and_retries_at_once(tmp_path):
    clock = task.Clock()
    events = EventLog(tmp_path / "events")
    receiver = Receiver(codes=[503])
    hooks = prepare((WebhookConfig("https://crm.example.org/hook", events=("delivered",)),))
    service = WebhookService(events, hooks, run_now, clock,
                             make_sender=lambda hook: Sender(hook, events, run_now, clock, post=receiver))
    service.startService()
    one = events.record("delivered", recipient="a@example.com")["id"]
    clock.advance(1.0)
    assert receiver.ids() == [one]
    service.reconfigure(prepare((WebhookConfig("https://crm.example.org/hook", events=("delivered", "bounced")),)))
    assert receiver.ids() == [one, one]  # the pause ended with the reload
    service.reconfigure([])
    events.record("delivered", recipient="b@example.com")
    clock.advance(1.0)
    assert receiver.ids() == [one, one]
    service.stopService()


def test_stop_cancels_a_request_in_flight(tmp_path):
    pending = Deferred()
    events, sender = make_sender(tmp_path, lambda *_: pending)
    sender.start()
    events.record("delivered", recipient="a@example.com")
    sender.nudge()
    sender.stop()
    assert pending.called  # cancelled: the daemon stops without waiting for a slow receiver


@pytest.mark.parametrize("event, kind", [
    ({"event": "bounced", "class": "invalid_recipient", "status": "5.1.1"}, "hard"),
    ({"event": "bounced", "class": "", "status": "5.1.1"}, "hard"),  # before the classifier: the RFC 3463 code
    ({"event": "bounced", "class": "mailbox_full", "status": "5.2.2"}, "soft"),
    ({"event": "bounced", "class": "", "status": "4.4.7"}, "soft"),
    ({"event": "bounced", "class": "policy", "status": "5.7.1"}, "soft"),
    ({"event": "complained", "class": "complaint"}, "complaint"),
])
def test_listmonk_bounce_types(event, kind):
    body = listmonk_bounce({"id": "e1", "recipient": "ann@example.com", "time": 0.0, **event})
    assert body["type"] == kind and body["email"] == "ann@example.com" and body["source"] == "mailhost"
    assert body["meta"]["id"] == "e1" and body["created_at"] == "1970-01-01T00:00:00Z"


def test_listmonk_gets_only_bounces_and_complaints_with_the_campaign(tmp_path):
    hook = WebhookConfig("https://lists.example.org/webhooks/bounce", format="listmonk")
    assert payload({"event": "delivered", "recipient": "a@example.com"}, hook) is None
    assert payload({"event": "suppressed", "recipient": "a@example.com"}, hook) is None
    body = json.loads(payload({"event": "bounced", "recipient": "a@example.com", "status": "5.1.1",
                               "campaign": UUID.upper()}, hook))
    assert body["campaign_uuid"] == UUID
    body = json.loads(payload({"event": "bounced", "recipient": "a@example.com", "campaign": "not-a-uuid"}, hook))
    assert "campaign_uuid" not in body  # listmonk would fail to cast it


def test_listmonk_authenticates_with_its_token_header(tmp_path):
    (tmp_path / "token").write_text("abc123\n")
    [hook] = prepare((WebhookConfig("https://lists.example.org/webhooks/bounce", format="listmonk",
                                    username="mailhost", password_file=tmp_path / "token"),))
    assert hook.headers({"id": "e1", "event": "bounced"}, b"{}", 0)["Authorization"] == "token mailhost:abc123"
    [plain] = prepare((WebhookConfig("https://crm.example.org/", username="u", password_file=tmp_path / "token"),))
    assert plain.headers({"id": "e1"}, b"{}", 0)["Authorization"] == "Basic dTphYmMxMjM="


def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    assert sign(b"k", b"{}", 5) == "t=5,v1=" + hmac.new(b"k", b"5.{}", hashlib.sha256).hexdigest()


def test_unreadable_ca_file_is_one_clear_error(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(Exception, match="no PEM certificate"):
        prepare((WebhookConfig("https://crm.example.org/", ca_file=tmp_path / "ca.pem"),))


def test_hook_keys_differ_for_the_same_url_twice():
    a, b = prepare((WebhookConfig("https://x.example.org/"), WebhookConfig("https://x.example.org/")))
    assert isinstance(a, Hook) and a.key != b.key
