"""The playground in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against a real server with API keys: open /, enter the key, send a message and watch the reply
stream in, fork the session, export it (a real download, re-imported through the API and through
the page's file upload), prime a document, reload and find the sessions again. A screenshot is saved
as a test artifact (the test's tmp dir, and RETSERVE_ARTIFACTS_DIR when set).

Without chromium, chromedriver or selenium the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.support.server import ROOT, run_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "playground-browser-key-0123456789"
WAIT_S = 60.0
FIRST, SECOND = "Tell me a story about a king and a river.", "What happened next?"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
]
# records the text length of the last assistant bubble at every DOM change while it streams
OBSERVE = """
window.__lengths = [];
new MutationObserver(() => {
  const t = document.querySelector('#messages .msg.assistant:last-of-type .text');
  if (t) window.__lengths.push(t.textContent.length);
}).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
"""


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian packages chromium and chromium-driver: scripts/system-deps.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser test cannot run: {reason}")
        pytest.skip(reason)
    with run_server({"RETSERVE_API_KEYS": json.dumps({KEY: "alice"})}) as url:
        yield url


@pytest.fixture
def api(base_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60.0) as c:
        yield c


@pytest.fixture
def browser(base_url: str, tmp_path: Path) -> Iterator[Any]:  # base_url: skipped or failed first
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    try:
        driver.execute_cdp_cmd(
            "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, cond: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(cond, message=f"waiting for {what}")


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: css(d, "body").get_attribute("data-ready") == "1", "the page to start")


def set_field(driver: Any, selector: str, value: str) -> None:
    el = css(driver, selector)
    el.clear()
    el.send_keys(value)


def sidebar_ids(driver: Any) -> list[str]:
    return [li.get_attribute("data-session-id") for li in all_css(driver, "#sessions li")]


def current(driver: Any) -> str:
    return css(driver, "#current-title").text


def send_and_watch(driver: Any, text: str) -> Any:
    """Send `text` and wait for the reply; the finished assistant bubble (its text element)."""
    before = len(all_css(driver, "#messages .msg.assistant"))
    driver.execute_script(OBSERVE)
    set_field(driver, "#prompt", text)
    css(driver, "#send").click()
    wait(driver, lambda d: len(all_css(d, "#messages .msg.assistant[data-done='1']")) > before, "the reply")
    return all_css(driver, "#messages .msg.assistant")[-1].find_element("css selector", ".text")


def prompt_tokens(driver: Any) -> int:
    """The prompt tokens the last turn sent (the page shows "read X + wrote Y tokens (reason)")."""
    info = css(driver, "#turn-info").text
    assert info.startswith("read "), info
    return int(info.split()[1])


def save_screenshot(driver: Any, tmp_path: Path) -> Path:
    shot = tmp_path / "playground.png"
    assert driver.save_screenshot(str(shot)), "the screenshot was not written"
    out = os.environ.get("RETSERVE_ARTIFACTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(out) / "playground.png")
    return shot


def test_playground_in_chromium(base_url: str, api: httpx.Client, browser: Any, tmp_path: Path) -> None:
    d = browser
    open_page(d, base_url + "/")
    # without the key the server says 401 and the page says what to do
    wait(d, lambda d: "API key" in css(d, "#notice").text, "the 401 notice")
    set_field(d, "#api-key", KEY)
    css(d, "#key-save").click()
    wait(d, lambda d: "API key set" in css(d, "#notice").text, "the key to be taken")
    for field, value in {"#temperature": "0.9", "#seed": "7", "#max_tokens": "48", "#top_k": "0"}.items():
        set_field(d, field, value)

    # a message auto-creates a session; the reply streams in (the bubble grows chunk by chunk)
    reply = send_and_watch(d, FIRST)
    sid = current(d)
    assert sid.startswith("sess_"), sid
    lengths = d.execute_script("return window.__lengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 2, f"the reply did not appear incrementally: lengths seen {lengths}"
    assert int(reply.get_attribute("data-chunks")) >= 2
    assert reply.text.strip() and grown[-1] == len(reply.get_attribute("textContent"))

    # the memory view matches the server: tokens, state size, an L x H heat map
    stats = api.get(f"/v1/sessions/{sid}/stats").json()
    assert stats["tokens"] > 0
    wait(d, lambda d: css(d, "#mem-tokens").text == str(stats["tokens"]), "the memory view")
    cells = all_css(d, "#heatmap .cell")
    assert len(cells) == stats["num_layers"] * stats["num_heads"]
    assert {(c.get_attribute("data-layer"), c.get_attribute("data-head")) for c in cells} == {
        (str(i), str(h)) for i in range(stats["num_layers"]) for h in range(stats["num_heads"])
    }

    # a second turn: more tokens read, the same state size
    tok = Tokenizer.from_dir(ROOT / "checkpoints" / "retserve-small")
    assert prompt_tokens(d) == len(tok.encode(f"User: {FIRST}\n\nAssistant:"))  # server/chat.py's template
    text = reply.get_attribute("textContent")
    send_and_watch(d, SECOND)
    # only the new turn is sent, after the "\n\n" that ends the model's turn in the template
    sep = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    assert prompt_tokens(d) == len(tok.encode(f"{sep}User: {SECOND}\n\nAssistant:"))
    stats2 = api.get(f"/v1/sessions/{sid}/stats").json()
    assert stats2["tokens"] > stats["tokens"] and stats2["state_bytes"] == stats["state_bytes"]
    wait(d, lambda d: css(d, "#mem-tokens").text == str(stats2["tokens"]), "the memory view")
    rows = [
        [td.text for td in tr.find_elements("css selector", "td")] for tr in all_css(d, "#mem-history tr")
    ]
    assert [r[0] for r in rows[-2:]] == [str(stats["tokens"]), str(stats2["tokens"])], rows
    assert len({r[1] for r in rows[1:]}) == 1, rows  # one state size, whatever the tokens read

    # fork: a new session with the same memory, selected in the page
    css(d, "#fork-current").click()
    wait(d, lambda d: current(d) not in (sid, "No session selected"), "the fork to be selected")
    fork = current(d)
    assert api.get(f"/v1/sessions/{fork}").json()["tokens"] == stats2["tokens"]
    wait(d, lambda d: {sid, fork} <= set(sidebar_ids(d)), "both sessions in the sidebar")

    # export: a real download, a valid state blob (the API imports it)
    css(d, "#export-current").click()
    blob = d.downloads / f"{fork}.rstate"
    wait(d, lambda d: blob.exists() and not list(d.downloads.glob("*.crdownload")), "the download")
    r = api.put(
        "/v1/sessions/reimported/state",
        content=blob.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == stats2["tokens"]

    # import through the page's file upload: a new session named after the file
    css(d, "#import-file").send_keys(str(blob))
    wait(d, lambda d: current(d) == f"{fork}-2", "the imported session")
    assert api.get(f"/v1/sessions/{fork}-2").json()["tokens"] == stats2["tokens"]

    # prime a document into it, with progress
    set_field(d, "#doc", "The river ran high with the rains of spring. " * 20)
    css(d, "#prime").click()
    wait(d, lambda d: css(d, "#prime-info").text.startswith("read "), "the document to be read")
    assert css(d, "#prime-progress").get_attribute("value") == css(d, "#prime-progress").get_attribute("max")
    primed = api.get(f"/v1/sessions/{fork}-2").json()["tokens"]
    assert primed > stats2["tokens"]
    wait(d, lambda d: css(d, "#mem-tokens").text == str(primed), "the memory view after priming")

    # reload: the sessions are in the sidebar, the current one and its transcript come back
    css(d, f"#sessions li[data-session-id='{sid}'] button[data-action='select']").click()
    wait(d, lambda d: current(d) == sid, "selecting the first session")
    d.refresh()
    open_page(d, d.current_url)
    assert {sid, fork, f"{fork}-2", "reimported"} <= set(sidebar_ids(d))
    assert current(d) == sid
    assert len(all_css(d, "#messages .msg.user")) == 2
    wait(
        d, lambda d: len(all_css(d, "#heatmap .cell")) == stats["num_layers"] * stats["num_heads"], "heat map"
    )
    assert css(d, "#temperature").get_attribute("value") == "0.9"  # sampling kept for the tab
    # no script errors and no Content-Security-Policy violations (only the expected keyless 401s)
    errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert all(" 401 " in m for m in errors), errors
    shot = save_screenshot(d, tmp_path)
    assert shot.stat().st_size > 10_000
