"""FastAPI dependencies as named Annotated aliases: the runtime and the caller's tenant."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import APIError
from server.ratelimit import RateLimiter
from server.runtime import Runtime
from server.settings import DEFAULT_TENANT


def get_runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise APIError(503, "the server is starting up; retry shortly", headers={"Retry-After": "1"})
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_tenant(request: Request, rt: RuntimeDep) -> str:
    """The tenant of the Bearer key (401 without a valid one when keys are configured); rate limited."""
    keys = rt.settings.api_keys
    if not keys:
        tenant, bucket = DEFAULT_TENANT, "anonymous"
    else:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = token.strip().encode()
        bucket = None  # the rate limit is per key
        for key in keys:  # constant-time compare against every key
            if hmac.compare_digest(key.encode(), given):
                bucket = key
        if bucket is None:
            raise APIError(
                401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        tenant = keys[bucket]
    wait = rt.limiter.take(bucket)
    if wait > 0:
        raise APIError(
            429,
            f"rate limit of {rt.limiter.rate:g} requests/s exceeded; retry after {wait:.2f}s",
            code="rate_limit_exceeded",
            headers={"Retry-After": RateLimiter.retry_after(wait)},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
