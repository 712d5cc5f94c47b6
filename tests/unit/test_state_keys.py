"""Key layout: a session's keys share one Redis Cluster slot; names that would break the tag are refused."""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_key_slot

from state_store import InvalidKeyError
from state_store.keys import (
    check_name,
    check_prefix,
    decode_cursor,
    encode_cursor,
    hash_tag,
    key_slot,
    meta_scan_pattern,
    session_from_meta_key,
    session_keys,
)


def test_all_keys_of_a_session_share_one_slot() -> None:
    for ns, sid in [("tenant-a", "s1"), ("t", "0f3c9a1e-7b2d-4c55-9a0e-1b2c3d4e5f60"), ("A.b@c", "x~y=z+w")]:
        k = session_keys("retserve:", ns, sid)
        keys = [k.meta, k.lock, *k.chunks("0123456789abcdef", 12)]
        slots = {redis_key_slot(key.encode()) for key in keys}
        assert len(slots) == 1, keys
        assert slots == {redis_key_slot(f"{ns}:{sid}".encode())}  # the slot of the tag's content
        assert key_slot(k.meta) == slots.pop()
        assert all(hash_tag(ns, sid) in key for key in keys)


def test_sessions_spread_over_slots() -> None:
    slots = {key_slot(session_keys("p:", "tenant", f"s{i}").meta) for i in range(2000)}
    assert len(slots) > 1800  # 16384 slots: 2000 sessions land almost all on different ones
    same_id = {key_slot(session_keys("p:", f"tenant{i}", "s").meta) for i in range(100)}
    assert len(same_id) > 90  # the namespace is part of the tag too


def test_known_slot_values() -> None:
    # Values from the Redis Cluster spec's CRC16 (redis-cli CLUSTER KEYSLOT gives the same).
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("prefix:{tenant:s1}:meta") == key_slot("tenant:s1")


@pytest.mark.parametrize(
    "bad", ["", "a:b", "a{b", "a}b", "a*b", "a?b", "a[b]", "a b", "é", "x" * 129, None, 5]
)
def test_names_that_would_break_the_tag_or_the_scan_are_refused(bad: object) -> None:
    with pytest.raises(InvalidKeyError, match="session id"):
        check_name("session id", bad)
    with pytest.raises(InvalidKeyError, match="namespace"):
        session_keys("p:", bad, "s")


def test_prefix_rules() -> None:
    assert check_prefix("") == ""
    assert check_prefix("retserve-test-abc:") == "retserve-test-abc:"
    for bad in ["{p}", "p{", "p*", "x" * 65, None]:
        with pytest.raises(InvalidKeyError, match="prefix"):
            check_prefix(bad)


def test_scan_pattern_matches_only_its_namespace() -> None:
    pat = meta_scan_pattern("p:", "ns1")
    assert pat == "p:{ns1:*}:meta"
    assert session_from_meta_key("p:", "ns1", session_keys("p:", "ns1", "abc").meta) == "abc"
    assert session_from_meta_key("p:", "ns1", session_keys("p:", "ns10", "abc").meta) is None
    assert session_from_meta_key("p:", "ns1", session_keys("p:", "ns1", "abc").lock) is None
    assert session_from_meta_key("q:", "ns1", session_keys("p:", "ns1", "abc").meta) is None


def test_cursors_round_trip_and_refuse_garbage() -> None:
    c = encode_cursor({"k": "redis", "n": "-", "c": 17, "p": ["a"]})
    assert decode_cursor(c, "redis") == {"k": "redis", "n": "-", "c": 17, "p": ["a"]}
    for bad in ["", "!!!", "e30", c + "x", "W10", "x" * 600_000, 3]:
        with pytest.raises(InvalidKeyError, match="cursor"):
            decode_cursor(bad, "redis")
    with pytest.raises(InvalidKeyError, match="backend"):
        decode_cursor(c, "memory")  # a cursor of another backend
