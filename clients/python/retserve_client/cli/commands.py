"""`retserve complete` and `retserve health`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from retserve_client.cli.app import JsonOpt, app, connection
from retserve_client.cli.output import Output, UsageProblem

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="Tokens to generate at most.")]
Temperature = Annotated[
    float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature (0: greedy).")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Sampling seed (same seed, same tokens).")]


def sampling(max_tokens: int, temperature: float, seed: int | None, **more: Any) -> dict[str, Any]:
    """The request's sampling fields (server JSON names); `seed` only when given."""
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, **more}
    if seed is not None:
        params["seed"] = seed
    return params


@app.command()
def complete(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help='The prompt text; "-" reads it from standard input.')],
    session: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Continue this session (its state holds what came before)."),
    ] = None,
    max_tokens: MaxTokens = 64,
    temperature: Temperature = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")] = 1.0,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Complete PROMPT (streamed to stdout as it is generated; one JSON document with --json)."""
    out = Output(as_json)
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text and session is None:
        raise UsageProblem("the prompt is empty (only a --session can continue without new text)")
    params = sampling(max_tokens, temperature, seed, top_p=top_p)
    if stop:
        params["stop"] = stop
    with connection(ctx).client() as client:
        if as_json:
            done = (
                client.generate(session, text, **params)
                if session is not None
                else client.completions(text, **params)
            )
            out.document(done.raw)
            return
        stream = (
            client.generate(session, text, stream=True, **params)
            if session is not None
            else client.completions(text, stream=True, **params)
        )
        with stream:
            for chunk in stream:
                out.text(chunk.text)
        out.text("\n")


@app.command()
def health(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check that the server answers; show its status and the model it serves."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        status = client.health()
        models = [m.id for m in client.models()]
    url = client.config.base_url
    if as_json:
        out.document({**status, "url": url, "models": models})
        return
    out.text(f"{url}: {status.get('status', '?')}; model: {', '.join(models) or '-'}\n")
