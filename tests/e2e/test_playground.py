"""The playground over HTTP (real servers): GET / and its static files (types, CSP, nothing from
elsewhere, no way out of server/static), RETSERVE_PLAYGROUND=false, and GET /v1/sessions/{id}/stats
(its JSON contract, norms checked against the exported state, auth, tenants, 404s).

The page in a real browser: test_playground_browser.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from model.config import RetNetConfig
from state_store import StateCodec
from tests.support.server import run_server

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "server" / "static"
ALICE, BOB = "playground-alice-key-0123", "playground-bob-key-456789"
TEXT = "The king rode out at dawn with twenty men, and the river ran high with the rains of spring."
TYPES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_server({"RETSERVE_API_KEYS": json.dumps({ALICE: "alice", BOB: "bob"})}) as url:
        yield url


def client(base_url: str, key: str | None = ALICE) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=60.0)


@pytest.fixture
def alice(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def error_code(r: httpx.Response, status: int) -> str | None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]["code"]


# ---- the page and its files ------------------------------------------------------------------------


def test_page_and_static_files(base_url: str) -> None:
    with client(base_url, key=None) as c:  # the page itself needs no key
        page = c.get("/")
        assert page.status_code == 200
        for name, ctype in TYPES.items():
            r = c.get(f"/static/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"] == f"{ctype}; charset=utf-8"
            assert r.content == (STATIC / name).read_bytes()
            assert r.headers["x-content-type-options"] == "nosniff"
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.content == (STATIC / "index.html").read_bytes()
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    # everything the page loads is served here: no CDN, no other origin
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert set(refs) >= {"/static/app.js", "/static/style.css"}
    for ref in refs:
        assert ref.startswith(("/static/", "data:")), ref
    for f in STATIC.iterdir():
        assert not re.search(r"https?://", f.read_text()), f"{f.name} refers to another origin"


@pytest.mark.parametrize(
    "path", ["/static/missing.js", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fpyproject.toml"]
)
def test_static_files_outside_the_list_are_404(base_url: str, path: str) -> None:
    with client(base_url, key=None) as c:
        error_code(c.get(path), 404)  # an error object, never a file


def test_the_page_is_not_in_the_api_document(alice: httpx.Client) -> None:
    doc = alice.get("/openapi.json").json()
    assert "/" not in doc["paths"] and not any(p.startswith("/static") for p in doc["paths"])
    op = doc["paths"]["/v1/sessions/{session_id}/stats"]["get"]
    assert {"200", "400", "401", "404", "503"} <= set(op["responses"])
    schema = doc["components"]["schemas"]["SessionStats"]
    assert {"id", "tokens", "state_bytes", "num_layers", "num_heads", "state_norms"} <= set(
        schema["required"]
    )
    assert schema["properties"]["object"]["default"] == "session.stats"


def test_playground_off() -> None:
    with run_server({"RETSERVE_PLAYGROUND": "false"}) as url, client(url, key=None) as c:
        for path in ("/", "/static/app.js", "/static/index.html"):
            assert c.get(path).status_code == 404, path
        assert c.get("/health").status_code == 200
        sid = c.post("/v1/sessions", json={"prompt": TEXT}).json()["id"]
        assert c.get(f"/v1/sessions/{sid}/stats").json()["tokens"] > 0  # the API is all there


# ---- GET /v1/sessions/{id}/stats ---------------------------------------------------------------


def exported_norms(c: httpx.Client, sid: str) -> list[list[float]]:
    """Norms computed here from the exported blob (decoded with the model's config and fingerprint)."""
    r = c.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200
    config = RetNetConfig.from_dict(json.loads((ROOT / "checkpoints/retserve-small/config.json").read_text()))
    state = StateCodec(config, r.headers["x-retserve-fingerprint"]).decode(r.content).state
    return [
        [float(layer[0, h].double().pow(2).sum().sqrt()) for h in range(layer.shape[1])]
        for layer in state.layers
    ]


def test_stats_contract(alice: httpx.Client) -> None:
    empty = alice.post("/v1/sessions", json={}).json()["id"]
    s0 = alice.get(f"/v1/sessions/{empty}/stats").json()
    L, H = s0["num_layers"], s0["num_heads"]
    assert s0["object"] == "session.stats" and s0["id"] == empty and s0["tokens"] == 0
    assert s0["state_norms"] == [[0.0] * H for _ in range(L)]
    heads, dk, dv = s0["state_shape"]
    assert heads == H and s0["state_bytes"] == L * H * dk * dv * 4 and s0["dtype"] == "float32"

    sid = alice.post("/v1/sessions", json={"prompt": TEXT}).json()["id"]
    s1 = alice.get(f"/v1/sessions/{sid}/stats").json()
    info = alice.get(f"/v1/sessions/{sid}").json()
    assert s1["tokens"] == info["tokens"] > 0 and s1["stored_bytes"] == info["size_bytes"]
    assert s1["version"] == info["version"]
    assert len(s1["state_norms"]) == L and all(len(row) == H for row in s1["state_norms"])
    assert torch.allclose(
        torch.tensor(s1["state_norms"]), torch.tensor(exported_norms(alice, sid)), rtol=1e-6
    )
    assert all(n > 0 for row in s1["state_norms"] for n in row)

    # reading more: more tokens, other norms, the same state size
    r = alice.post(f"/v1/sessions/{sid}/prime", json={"prompt": " " + TEXT * 4})
    assert r.status_code == 200, r.text
    s2 = alice.get(f"/v1/sessions/{sid}/stats").json()
    assert s2["tokens"] > s1["tokens"] and s2["state_bytes"] == s1["state_bytes"]
    assert s2["state_norms"] != s1["state_norms"] and s2["version"] > s1["version"]


def test_stats_auth_tenants_and_missing(base_url: str, alice: httpx.Client) -> None:
    sid = alice.post("/v1/sessions", json={"prompt": TEXT}).json()["id"]
    with client(base_url, key=None) as anon, client(base_url, key="not-a-key-at-all") as bad:
        assert error_code(anon.get(f"/v1/sessions/{sid}/stats"), 401) == "invalid_api_key"
        assert error_code(bad.get(f"/v1/sessions/{sid}/stats"), 401) == "invalid_api_key"
    with client(base_url, key=BOB) as bob:  # another tenant's session is not found
        assert error_code(bob.get(f"/v1/sessions/{sid}/stats"), 404) == "session_not_found"
    assert error_code(alice.get("/v1/sessions/no-such-session/stats"), 404) == "session_not_found"
    assert alice.get(f"/v1/sessions/{'x' * 129}/stats").status_code == 400  # not a session id
    assert alice.get(f"/v1/sessions/{sid}/stats").status_code == 200
    assert alice.post(f"/v1/sessions/{sid}/stats").status_code == 405
    alice.delete(f"/v1/sessions/{sid}")
    assert error_code(alice.get(f"/v1/sessions/{sid}/stats"), 404) == "session_not_found"
