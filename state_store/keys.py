"""Key names: namespaces, session ids, Redis keys with Cluster hash tags, list cursors.

Every key of one session carries the hash tag `{<namespace>:<session>}`, so Redis Cluster puts the
session's metadata, data chunks and lock in one slot: the Lua scripts and pipelines that touch them
never cross slots. Names may not contain `{`, `}` or `:` (they would move or blur the tag) nor glob
characters (the namespace is part of a SCAN pattern).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot as _crc_key_slot

from state_store.errors import InvalidKeyError

NAME_RE = re.compile(r"[A-Za-z0-9_.@+=~-]{1,128}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_.@+=~:/-]{0,64}")
MAX_CURSOR_CHARS = 512 * 1024


def check_name(kind: str, value: object) -> str:
    """Validate a namespace or session id (1-128 of A-Z a-z 0-9 _ . @ + = ~ -)."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidKeyError(
            f"{kind} {value!r} is invalid: use 1-128 characters from A-Z a-z 0-9 _ . @ + = ~ -"
        )
    return value


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise InvalidKeyError(
            f"key prefix {prefix!r} is invalid: use up to 64 characters from A-Z a-z 0-9 _ . @ + = ~ : / -"
            " (no braces: they would change the Redis Cluster hash tag)"
        )
    return prefix


def hash_tag(namespace: str, session: str) -> str:
    return "{" + check_name("namespace", namespace) + ":" + check_name("session id", session) + "}"


@dataclass(frozen=True)
class SessionKeys:
    """The Redis keys of one session (all in one Cluster slot)."""

    base: str  # prefix + hash tag

    @property
    def meta(self) -> str:
        return self.base + ":meta"

    @property
    def lock(self) -> str:
        return self.base + ":lock"

    def chunk(self, generation: str, index: int) -> str:
        return f"{self.base}:data:{generation}:{index}"

    def chunks(self, generation: str, count: int) -> list[str]:
        return [self.chunk(generation, i) for i in range(count)]


def session_keys(prefix: str, namespace: str, session: str) -> SessionKeys:
    return SessionKeys(check_prefix(prefix) + hash_tag(namespace, session))


def meta_scan_pattern(prefix: str, namespace: str) -> str:
    """SCAN MATCH pattern for the metadata keys of every session of a namespace."""
    return check_prefix(prefix) + "{" + check_name("namespace", namespace) + ":*}:meta"


def session_from_meta_key(prefix: str, namespace: str, key: str) -> str | None:
    head = prefix + "{" + namespace + ":"
    if not (key.startswith(head) and key.endswith("}:meta")):
        return None
    sid = key[len(head) : -len("}:meta")]
    return sid if NAME_RE.fullmatch(sid) else None


def key_slot(key: str) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag), as redis-py computes it."""
    return _crc_key_slot(key.encode())


# ---- list cursors -------------------------------------------------------------------------------
def encode_cursor(data: dict[str, Any]) -> str:
    """An opaque, URL-safe list cursor."""
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: object, kind: str) -> dict[str, Any]:
    """Parse a cursor made by encode_cursor for a `kind` backend; InvalidKeyError otherwise."""
    bad = InvalidKeyError(
        f"list cursor {str(cursor)[:40]!r} is invalid: pass None for the first page, then the cursor"
        " that the previous page returned (cursors belong to the backend that made them)"
    )
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_CHARS:
        raise bad
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(data, dict) or data.get("k") != kind:
        raise bad
    return data
