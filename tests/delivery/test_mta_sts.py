"""MTA-STS parsing, matching and the policy cache (RFC 8461), table-driven and fuzzed."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhost.delivery.mta_sts import PolicyError, PolicyStore, mx_matches, parse_policy, parse_sts_record


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc", "v=spf1 -all"], "abc"),  # other records are ignored (3.1)
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two policies: none
    (["v=STSv1; id="], None),
    (["v=STSv1; id=" + "a" * 33], None),  # at most 32 characters
    (["v=STSv1; id=ab-c"], None),  # alphanumeric only
    (["v=STSv2; id=abc"], None),
    (["id=abc; v=STSv1"], None),  # must begin with v=STSv1
    (["v=STSv1; id=abc; ext=1"], "abc"),
    ([], None),
])
def test_sts_record(records, expected):
    assert parse_sts_record(records) == expected


GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"


def test_policy_fields():
    policy = parse_policy(GOOD, "example.com", "id1", 100.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.expires) == (
        "enforce", ("mail.example.com", "*.example.net"), 604800, 604900.0)
    assert policy.lines() == ["version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.example.net",
                              "max_age: 604800"]
    assert parse_policy(GOOD.replace("\r\n", "\n")).mx == policy.mx  # LF alone is accepted too
    assert parse_policy(GOOD + "future_key: x\n").mode == "enforce"  # unknown keys are ignored


@pytest.mark.parametrize("text", [
    "",
    GOOD.replace("STSv1", "STSv2"),
    GOOD.replace("enforce", "strict"),
    GOOD.replace("604800", "31557601"),  # over a year
    GOOD.replace("604800", "-1"),
    GOOD.replace("max_age: 604800\r\n", ""),
    "version: STSv1\nmode: enforce\nmax_age: 60\n",  # enforce without mx
    GOOD.replace("mail.example.com", "mail example.com"),
    GOOD.replace("*.example.net", "a.*.example.net"),
    "version STSv1\n",
])
def test_bad_policies(text):
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_mode_none_needs_no_mx():
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


@pytest.mark.parametrize("pattern, host, expected", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.com.", True),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard is one whole label (4.1)
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mx1.example.org", False),
    ("mail.example.com", "mail2.example.com", False),
])
def test_mx_matches(pattern, host, expected):
    assert mx_matches(pattern, host) is expected


@given(st.text(max_size=300))
def test_parse_policy_never_raises_anything_else(text):
    try:
        parse_policy(text)
    except PolicyError:
        pass


@given(st.lists(st.text(max_size=80), max_size=4))
def test_parse_sts_record_never_raises(records):
    result = parse_sts_record(records)
    assert result is None or result.isalnum()


def test_store_keeps_policies_for_max_age(tmp_path):
    store = PolicyStore(tmp_path / "mta-sts")
    policy = parse_policy(GOOD, "example.com", "id1", time.time())
    store.save(policy)
    assert store.load("example.com") == policy
    assert store.load("EXAMPLE.com") == policy
    expired = parse_policy(GOOD.replace("604800", "1"), "old.example", "id1", time.time() - 10)
    store.save(expired)
    assert store.load("old.example") is None  # past max_age: fetched again
    store.forget_expired()
    assert sorted(p.name for p in (tmp_path / "mta-sts").iterdir()) == ["example.com.json"]


@pytest.mark.parametrize("domain", ["../etc", "a/b.example", "", ".", "example"])
def test_store_refuses_names_that_are_not_plain_domains(tmp_path, domain):
    store = PolicyStore(tmp_path / "mta-sts")
    store.save(parse_policy(GOOD, domain, "id1", time.time()))
    assert store.load(domain) is None
    assert not (tmp_path / "mta-sts").exists() or list((tmp_path / "mta-sts").iterdir()) == []


def test_store_ignores_damaged_files(tmp_path):
    folder = tmp_path / "mta-sts"
    folder.mkdir()
    (folder / "example.com.json").write_text("{not json")
    (folder / "example.org.json").write_text(json.dumps({"id": "x", "fetched": time.time(), "text": "mode: bad"}))
    store = PolicyStore(folder)
    assert store.load("example.com") is None and store.load("example.org") is None
