"""Liveness, readiness and Prometheus metrics (no auth: scrape and probe from inside the deployment)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import RuntimeDep

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    rt = getattr(request.app.state, "runtime", None)
    checks = {"model": rt is not None, "engine": False, "store": False}
    problems = []
    if rt is None:
        problems.append("the model is still loading")
    else:
        eng = rt.engine
        checks["engine"] = eng.alive and eng.error is None and eng.consecutive_failures < 3
        if not (eng.alive and eng.error is None):
            problems.append(f"the engine is not running ({eng.error or 'stopped'})")
        elif eng.consecutive_failures >= 3:
            problems.append(f"the engine's last {eng.consecutive_failures} iterations failed (see the log)")
        try:
            await asyncio.wait_for(rt.store.ping(), timeout=2.0)
            checks["store"] = True
        except Exception as e:
            problems.append(f"the state store is unreachable: {e}")
    ok = not problems
    body = {"status": "ready" if ok else "not ready", "checks": checks, "problems": problems}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(rt: RuntimeDep) -> Response:
    rt.metrics.observe_iterations(rt.engine)
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)
