"""FastAPI dependencies as named Annotated aliases: the runtime and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.auth import ANONYMOUS, match_key, rate_limited
from server.errors import APIError
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
        tenant, bucket = DEFAULT_TENANT, ANONYMOUS
    else:
        bucket = match_key(keys, request.headers.get("authorization", ""))  # the rate limit is per key
        tenant = keys[bucket]
    wait = rt.limiter.take(bucket)
    if wait > 0:
        raise rate_limited(rt.limiter, wait)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
