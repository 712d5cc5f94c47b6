"""HTTP benchmark (not a test): the server's overhead over the raw engine, concurrency, and primed sessions.

Prints, for the shipped model on this machine:
  - single-stream tokens/s through HTTP/SSE vs the raw engine in-process (goal >= 0.85; >= 1,000 tok/s)
  - aggregate tokens/s at 32 concurrent HTTP streams vs 1 (goal >= 8x; >= 6,000 tok/s), and vs the bare
    decode step's B=32 throughput (32 / its time per step, on an engine-like thread; goal >= 0.85)
  - time to first token continuing a session primed with 8k tokens (state loaded from Redis) vs
    sending the 8k tokens again (goal <= 1/20)

Usage: python bench/bench_http.py [--tokens 256] [--threads 2] [--store redis://127.0.0.1:6379/0] [--compile]
       [--skip-primed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams  # noqa: E402
from server.engine.decode import DecodeStep  # noqa: E402
from tests.support.server import run_server  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog and"


async def raw_engine(tokens: int, threads: int, compile: bool = False) -> float:
    torch.set_num_threads(1)
    ckpt = ROOT / "checkpoints/retserve-small"
    model, tok = from_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    eng = Engine(model, tok, EngineConfig(num_threads=threads, compile=compile))
    try:
        p = EngineSamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        ids = tok.encode(PROMPT)
        await eng.submit(EngineRequest(ids, p)).collect()
        rates = []
        for _ in range(5):
            t0 = time.perf_counter()
            got, _, _ = await eng.submit(EngineRequest(ids, p)).collect()
            rates.append(len(got) / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        eng.shutdown()


def bare_step_rate(threads: int, compile: bool, batch: int = 32, steps: int = 100) -> float:
    """Tokens/s of the engine's decode step alone at `batch` rows, on a thread of its own like the
    engine's (main thread at 1 torch thread): the ceiling for `batch` concurrent streams."""
    torch.set_num_threads(1)
    model = from_pretrained(ROOT / "checkpoints/retserve-small").eval()
    out: list[float] = []

    def run() -> None:
        torch.set_num_threads(threads)
        step = DecodeStep(model, compile, (1, 2, 4, 8, batch))
        step.warmup()
        state, toks = model.empty_state(batch), torch.randint(0, 8000, (batch, 1))
        with torch.no_grad():
            for _ in range(10):
                step(toks, state)
            rates = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(steps // 5):
                    step(toks, state)
                rates.append(batch * (steps // 5) / (time.perf_counter() - t0))
        out.append(statistics.median(rates))

    th = threading.Thread(target=run)
    th.start()
    th.join()
    return out[0]


USAGE_RE = re.compile(rb"data: (\{[^\n]*\"usage\"[^\n]*\})\n\n")


async def stream_one(url: str, body: dict) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first token, total seconds) of one SSE completion.

    A deliberately light client (a raw HTTP/1.1 request on an asyncio socket; only the final usage
    chunk is parsed): it shares the CPU with the server on a small box and is not what is measured.
    """
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + payload)
    ttft = None
    tail = b""
    first = b""
    while data := await reader.read(1 << 16):
        if not first:
            first = data[:64]
        if ttft is None and b"data: {" in data:
            ttft = time.perf_counter() - t0
        tail = (tail + data)[-8192:]
    writer.close()
    if not first.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"request failed: {first!r}")
    found = USAGE_RE.findall(tail)
    if not found:
        raise RuntimeError(f"stream did not end with a usage chunk: {tail[-300:]!r}")
    return json.loads(found[-1])["usage"]["completion_tokens"], ttft or 0.0, time.perf_counter() - t0


async def http_figures(url: str, tokens: int, long_len: int, primed: bool = True) -> dict:
    out: dict = {}
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=100)) as c:
        await stream_one(url, body)
        rates = []
        for _ in range(5):
            n, _, dt = await stream_one(url, body)
            rates.append(n / dt)
        out["single"] = statistics.median(rates)
        # the same long requests as above: 32 HTTP requests never arrive in one engine iteration,
        # and with short requests the staggered joins and leaves would dominate the figure
        for conc in (1, 32):
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                res = await asyncio.gather(*(stream_one(url, body) for _ in range(conc)))
                rates.append(sum(n for n, _, _ in res) / (time.perf_counter() - t0))
            out[f"conc{conc}"] = statistics.median(rates)
        if not primed:
            return out
        # primed session vs re-sending the document (token ids, so both read exactly the same tokens)
        tok = load_tokenizer(ROOT / "checkpoints/retserve-small")
        doc = (tok.encode((PROMPT + " ") * (long_len // 4)))[:long_len]
        n_doc = len(doc)
        sid = "bench-" + uuid.uuid4().hex
        r = await c.post("/v1/sessions", json={"session_id": sid, "prompt": doc})
        r.raise_for_status()
        out["primed_tokens"] = r.json()["tokens"]
        q = tok.encode(" And then")
        resend, resume = [], []
        for _ in range(3):
            _, ttft, _ = await stream_one(url, {"prompt": doc + q, "max_tokens": 1, "temperature": 0})
            resend.append(ttft)
            fork = (await c.post(f"/v1/sessions/{sid}/fork", json={})).json()["id"]
            _, ttft, _ = await stream_one(
                url, {"prompt": q, "max_tokens": 1, "temperature": 0, "session_id": fork}
            )
            resume.append(ttft)
            await c.delete(f"/v1/sessions/{fork}")
        await c.delete(f"/v1/sessions/{sid}")
        out["doc_tokens"] = n_doc
        out["ttft_resend"] = statistics.median(resend)
        out["ttft_resume"] = statistics.median(resume)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (both sides)")
    ap.add_argument("--skip-primed", action="store_true", help="skip the primed-session TTFT figure")
    args = ap.parse_args()
    raw = float("nan") if args.skip_raw else asyncio.run(raw_engine(args.tokens, args.threads, args.compile))
    bare = bare_step_rate(args.threads, args.compile)
    env = {
        "RETSERVE_STORE_URL": args.store,
        "RETSERVE_NUM_THREADS": str(args.threads),
        "RETSERVE_MAX_TOKENS_LIMIT": str(max(4096, args.tokens)),
        "RETSERVE_COMPILE": "true" if args.compile else "false",
    }
    with run_server(env) as url:
        f = asyncio.run(http_figures(url, args.tokens, args.long, not args.skip_primed))
    print(
        f"retserve HTTP benchmark, torch {torch.__version__}, engine threads {args.threads},"
        f" compile {args.compile},"
        f" store {args.store}"
    )
    print(
        f"  single stream: raw engine {raw:7.1f} tok/s, HTTP/SSE {f['single']:7.1f} tok/s"
        f"  (ratio {f['single'] / raw:.2f}, goal >= 0.85; goal >= 1,000 tok/s)"
    )
    print(
        f"  32 concurrent HTTP streams: {f['conc32']:7.1f} tok/s vs 1: {f['conc1']:7.1f}"
        f"  ({f['conc32'] / f['conc1']:.1f}x, goal >= 8x; goal >= 6,000 tok/s)"
    )
    print(
        f"  bare decode step at B=32: {bare:7.1f} tok/s; 32 HTTP streams reach {f['conc32'] / bare:.2f}"
        " of it (goal >= 0.85)"
    )
    if args.skip_primed:
        return
    print(
        f"  {f['doc_tokens']}-token document: TTFT re-sending it {f['ttft_resend'] * 1e3:7.1f} ms,"
        f" continuing the primed session ({f['primed_tokens']} tokens, state from the store)"
        f" {f['ttft_resume'] * 1e3:6.1f} ms"
        f"  (ratio 1/{f['ttft_resend'] / f['ttft_resume']:.0f}, goal <= 1/20)"
    )


if __name__ == "__main__":
    main()
