"""Unsubscribe tokens (mailhost.feedback.unsubscribe): made and checked with one key, nothing stored."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mailhost.feedback.unsubscribe import (KEY_BYTES, MAILTO_PREFIX, UnsubscribeKeyError, UnsubscribeTokens,
                                           Unsubscribe, base_url, ensure_key, list_unsubscribe_headers, read_key)

TOKENS = UnsubscribeTokens(b"k" * KEY_BYTES)


@pytest.mark.parametrize("recipient", [
    "bob@gmail.com", "Bob+News@Gmail.COM", "first.last@example.org", '"john doe"@example.org', "jörg@bücher.example",
    "a" * 64 + "@" + "d" * 60 + ".example",
])
def test_link_token_round_trips(recipient: str) -> None:
    token = TOKENS.link_token(recipient, "news@Shop.Example.")
    assert TOKENS.verify(token) == Unsubscribe(recipient.lower(), "shop.example")
    assert TOKENS.verify(token.upper()) == Unsubscribe(recipient.lower(), "shop.example")  # case changed in transit
    assert all(c.isalnum() or c in "._+=-" for c in token)  # URL-safe without quoting


def test_forged_garbled_and_foreign_tokens_are_refused() -> None:
    token = TOKENS.link_token("bob@gmail.com", "shop.example")
    mac, _, payload = token.partition(".")
    other = UnsubscribeTokens(b"x" * KEY_BYTES)
    for bad in [
        token.replace("bob=", "eve="),  # another recipient, the same MAC
        token.replace("=shop.example", "=other.example"),  # another sender domain
        mac[:-1] + ("a" if mac[-1] != "a" else "b") + "." + payload,  # one MAC character changed
        mac[:-1] + "." + payload,  # MAC cut short
        "2" + token[1:],  # an unknown version
        token + "=more", "", "1h", ".", "1h." + payload, "1h" + "a" * 26 + ".bob+zz=gmail.com=shop.example",
        other.link_token("bob@gmail.com", "shop.example"),  # another key
    ]:
        assert TOKENS.verify(bad) is None, bad


def test_mailto_token_fits_a_local_part_or_is_left_out() -> None:
    token = TOKENS.mailto_token("bob+news@gmail.com", "news@shop.example", "shop.example")
    assert token is not None and len(MAILTO_PREFIX + token) <= 64
    # The domain the mail goes to stands for the sender domain; elsewhere it is refused.
    assert TOKENS.verify(token, mail_domain="Shop.Example") == Unsubscribe("bob+news@gmail.com", "shop.example")
    assert TOKENS.verify(token, mail_domain="other.example") is None
    assert TOKENS.verify(token) is None  # over https the sender domain must be in the token
    # Mail from a domain that is not ours names it, and the mailto goes to one of ours.
    token = TOKENS.mailto_token("bob@gmail.com", "news@client.example", "example.test")
    assert TOKENS.verify(token, mail_domain="example.test") == Unsubscribe("bob@gmail.com", "client.example")
    # Too long for 64 octets: no mailto form, the https link only.
    assert TOKENS.mailto_token("firstname.middlename.lastname@example.org", "shop.example", "shop.example") is None


def test_headers_and_base_url() -> None:
    lines = list_unsubscribe_headers(TOKENS, "https://mail.example.test:8443", "bob@gmail.com", "news@shop.example",
                                     "shop.example").decode()
    assert lines.startswith("List-Unsubscribe: <https://mail.example.test:8443/unsubscribe/1h")
    assert ",\n <mailto:unsubscribe+1m" in lines
    assert lines.endswith("\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n")
    mailto_only = list_unsubscribe_headers(TOKENS, None, "bob@gmail.com", "news@shop.example", "shop.example")
    assert b"https" not in mailto_only and b"List-Unsubscribe-Post" not in mailto_only  # RFC 8058 3.1
    assert base_url(None, "tcp:8443:interface=127.0.0.1", "mx.example") == "https://mx.example:8443"
    assert base_url(None, "tcp:port=443", "mx.example") == "https://mx.example"
    assert base_url("https://mail.example.org/", "tcp:8443", "mx.example") == "https://mail.example.org"
    assert base_url(None, None, "mx.example") is None


def test_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    assert read_key(tmp_path) is None
    key = ensure_key(tmp_path)
    path = tmp_path / "unsubscribe.key"
    assert len(key) == KEY_BYTES and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key(tmp_path) == key == read_key(tmp_path)  # a restart keeps the links working
    assert [p.name for p in tmp_path.iterdir()] == ["unsubscribe.key"]
    path.write_bytes(b"short")
    with pytest.raises(UnsubscribeKeyError, match="unsubscribe.key"):
        ensure_key(tmp_path)
