"""API-key authentication: which configured key a request's `Authorization: Bearer <key>` carries.

Shared by the request guard (`server/bodylimit.py`, which refuses bad keys before reading a body)
and the tenant dependency (`server/deps.py`).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from server.errors import APIError
from server.ratelimit import RateLimiter

ANONYMOUS = "anonymous"  # the rate-limit bucket of everyone when no keys are configured


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def match_key(keys: Mapping[str, str], authorization: str) -> str:
    """The configured key that `authorization` carries (compared in constant time against every key);
    401 without a Bearer key or with an unknown one."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    found = None
    for key in keys:
        if hmac.compare_digest(key.encode(), given):
            found = key
    if found is None:
        raise unauthorized("invalid API key")
    return found


def rate_limited(limiter: RateLimiter, wait: float) -> APIError:
    """The 429 for a caller who must wait `wait` seconds for the next token of its bucket."""
    return APIError(
        429,
        f"rate limit of {limiter.rate:g} requests/s per API key"
        f"{' (one budget for every replica)' if limiter.shared else ''} exceeded; retry after {wait:.2f}s",
        code="rate_limit_exceeded",
        headers={"Retry-After": RateLimiter.retry_after(wait)},
    )
