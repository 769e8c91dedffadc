"""SRS return paths (mailhost.feedback.srs): made, reversed, forged, expired, case-folded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest
from hypothesis import given, strategies as st

from mailhost.feedback.srs import HASH_CHARS, KEY_BYTES, Srs, daemon_srs, is_srs, key_path

KEY = b"s" * KEY_BYTES
DAY = 86400
NOW = 20000 * DAY + 3600  # day 20000: 20000 % 1024 = 544 = "RA" in base32 ("R" is 17, "A" 0)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(now: float = NOW, key: bytes = KEY, max_age: int = 21) -> tuple[Srs, Clock]:
    clock = Clock(now)
    return Srs(key, max_age, clock), clock


def test_srs0_form_and_reverse():
    srs, _ = make()
    address = srs.forward("Alice@Sender.example", "example.test")
    local, _, domain = address.rpartition("@")
    tag, hash_, stamp, orig_domain, orig_local = local.split("=")
    assert (tag, stamp, orig_domain, orig_local, domain) == ("SRS0", "RA", "Sender.example", "Alice", "example.test")
    assert len(hash_) == HASH_CHARS
    assert srs.reverse(local) == "Alice@Sender.example"


def test_hash_is_libsrs2s_hmac_sha1_of_the_lower_cased_fields():
    srs, _ = make()
    local = srs.forward("Alice@Sender.example", "example.test").rpartition("@")[0]
    expected = base64.b64encode(hmac.new(KEY, b"ra" + b"sender.example" + b"alice", hashlib.sha1).digest())
    assert local.split("=")[1] == expected.decode()[:HASH_CHARS]


def test_hash_and_stamp_compare_without_case():
    srs, _ = make()
    local = srs.forward("bob@remote.test", "example.test").rpartition("@")[0]
    assert srs.reverse(local.lower()) == "bob@remote.test"
    assert srs.reverse(local.upper()) == "BOB@REMOTE.TEST"  # relays may change case; mail still goes back


@pytest.mark.parametrize("change", [
    lambda l: l.replace("=remote.test=", "=evil.test="),  # another domain
    lambda l: l[:-3] + "eve",  # another local part
    lambda l: l[:5] + ("A" if l[5] != "A" else "B") + l[6:],  # a hash character changed
    lambda l: l[:5] + l[6:],  # a hash too short
    lambda l: "SRS0=" + "=".join(l[5:].split("=")[1:]),  # no hash
    lambda l: l.rsplit("=", 1)[0],  # no local part
    lambda l: l.replace("SRS0=", "SRS0"),  # no separator
])
def test_forged_or_garbled_addresses_do_not_verify(change):
    srs, _ = make()
    local = srs.forward("bob@remote.test", "example.test").rpartition("@")[0]
    assert srs.reverse(change(local)) is None


def test_another_key_does_not_verify():
    local = make()[0].forward("bob@remote.test", "example.test").rpartition("@")[0]
    assert make(key=b"t" * KEY_BYTES)[0].reverse(local) is None


def test_expires_after_max_age_days():
    srs, clock = make()
    local = srs.forward("bob@remote.test", "example.test").rpartition("@")[0]
    clock.now = NOW + 21 * DAY
    assert srs.reverse(local) == "bob@remote.test"  # the 21st day still counts
    clock.now = NOW + 22 * DAY
    assert srs.reverse(local) is None


def test_stamp_wraps_after_1024_days():
    # Made on day 1023 (stamp "77"), checked on day 1024 + 3 (stamp "AD"): four days old.
    srs, clock = make(now=1023 * DAY)
    local = srs.forward("bob@remote.test", "example.test").rpartition("@")[0]
    assert local.split("=")[2] == "77"
    clock.now = (1024 + 3) * DAY
    assert srs.stamp() == "AD"
    assert srs.reverse(local) == "bob@remote.test"


def test_a_stamp_from_the_future_is_an_old_one():
    srs, _ = make()
    assert srs.fresh("RA") and srs.fresh("QL")  # today, 21 days ago
    assert not srs.fresh("RB")  # tomorrow: 1023 days ago
    assert not srs.fresh("R") and not srs.fresh("R1") and not srs.fresh("Rä")


def test_srs1_for_someone_elses_srs0_and_back():
    srs, _ = make()
    theirs = "SRS0=abcd=TT=orig.example=alice@forwarder.example"
    ours = srs.forward(theirs, "example.test")
    local = ours.rpartition("@")[0]
    assert local.startswith("SRS1=") and "=forwarder.example==abcd=TT=orig.example=alice" in local
    assert srs.reverse(local) == theirs  # back to the first forwarder, who knows the sender
    forged = local.replace("=forwarder.example=", "=evil.example=")
    assert srs.reverse(forged) is None


def test_srs1_forwarded_again_keeps_the_first_forwarder():
    srs, _ = make()
    other, _ = make(key=b"o" * KEY_BYTES)
    theirs = other.forward("SRS0=abcd=TT=orig.example=alice@forwarder.example", "second.example")
    ours = srs.forward(theirs, "example.test")
    assert ours.rpartition("@")[0].split("=", 2)[2] == "forwarder.example==abcd=TT=orig.example=alice"
    assert srs.reverse(ours.rpartition("@")[0]) == "SRS0=abcd=TT=orig.example=alice@forwarder.example"


@pytest.mark.parametrize("sender", [
    '"a b"@remote.test',  # a quoted local part cannot be carried unquoted
    "bob@[192.0.2.1]",  # an address literal
    "x" * 40 + "@" + "y" * 20 + ".test",  # longer than 64 octets as SRS0
    "no-domain",
])
def test_senders_that_cannot_be_carried(sender):
    assert make()[0].forward(sender, "example.test") is None


def test_is_srs():
    assert is_srs("SRS0=x") and is_srs("srs1+x") and is_srs("Srs0-x")
    assert not is_srs("srs0") and not is_srs("srs2=x") and not is_srs("srs0.x") and not is_srs("bob")


def test_key_made_once_0600_and_kept(tmp_path):
    first = daemon_srs(tmp_path)
    assert oct(key_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    local = first.forward("bob@remote.test", "example.test").rpartition("@")[0]
    assert daemon_srs(tmp_path).reverse(local) == "bob@remote.test"  # a restart keeps bounces coming back


def test_a_key_file_of_the_wrong_size_is_an_error(tmp_path):
    from mailhost.ops.keyfile import KeyFileError

    key_path(tmp_path).write_bytes(os.urandom(5))
    with pytest.raises(KeyFileError, match="srs.key"):
        daemon_srs(tmp_path)


@given(st.text(min_size=1, max_size=80))
def test_reverse_never_raises(local):
    assert make()[0].reverse(local) is None or is_srs(local)


@given(st.from_regex(r"[a-z0-9.+_-]{1,20}", fullmatch=True), st.from_regex(r"[a-z0-9-]{1,15}\.[a-z]{2,6}", fullmatch=True))
def test_round_trip(local, domain):
    srs, _ = make()
    made = srs.forward(f"{local}@{domain}", "example.test")
    assert made is not None and srs.reverse(made.rpartition("@")[0]) == f"{local}@{domain}"
