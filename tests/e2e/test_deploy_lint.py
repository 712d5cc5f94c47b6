"""Lints of every deployment file under docker/: hadolint (Dockerfile), the compose specification,
Kubernetes schemas (strict), promtool (Prometheus config and alert rules), and every metric the Grafana
dashboard and the alert rules name exists in a real server's /metrics.

A missing tool skips its test with the reason, except under CI=true, where it is a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import run_server

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
METRIC_RE = re.compile(r"\bretserve:[A-Za-z0-9_:]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def tool(name: str) -> str:
    """The tool's path (the venv's scripts first, then PATH); skip, or fail under CI=true, without it."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        msg = f"{name} is not installed (pip install -e '.[dev]'; promtool: make system-deps)"
        if IN_CI:
            pytest.fail(msg + " (CI=true: deployment lints may not be skipped)")
        pytest.skip(msg)
    return found


def check(*args: str | Path) -> str:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out}"
    return out


def test_dockerfile_hadolint_clean():
    out = check(tool("hadolint"), "--failure-threshold", "style", DOCKER / "Dockerfile")
    assert out.strip() == "", out  # not even info-level findings


def test_compose_files_follow_the_compose_spec():
    files = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
    check(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files)
    gpu = yaml.safe_load(files[1].read_text())["services"]["retserve"]["deploy"]["resources"]
    assert gpu["reservations"]["devices"][0]["driver"] == "nvidia"
    base = yaml.safe_load(files[0].read_text())["services"]
    grace = float(base["retserve"]["stop_grace_period"].removesuffix("s"))
    assert grace > 2 * float(base["retserve"]["environment"]["RETSERVE_SHUTDOWN_TIMEOUT_S"])
    cmd = base["redis"]["command"]
    assert cmd[cmd.index("--appendfsync") + 1] == "everysec" and "healthcheck" in base["redis"]


def test_kubernetes_manifests_are_valid():
    manifests = sorted((DOCKER / "k8s").glob("*.yaml"))
    assert {m.stem for m in manifests} >= {"deployment", "service", "configmap", "secret", "pdb"}
    check(tool("kubernetes-validate"), "--strict", *manifests)
    dep = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    cfg = yaml.safe_load((DOCKER / "k8s" / "configmap.yaml").read_text())["data"]
    assert pod["terminationGracePeriodSeconds"] > 2 * float(cfg["RETSERVE_SHUTDOWN_TIMEOUT_S"])
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_prometheus_config_and_rules():
    promtool = tool("promtool")
    check(promtool, "check", "config", DOCKER / "prometheus" / "prometheus.yml")
    check(promtool, "check", "rules", DOCKER / "prometheus" / "rules.yml")


def _expressions() -> dict[str, list[str]]:
    """Every PromQL expression of the dashboard and the alert rules, by where it comes from."""
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "retserve.json").read_text())
    exprs = {f"panel {p['title']!r}": [t["expr"] for t in p["targets"]] for p in dash["panels"]}
    rules = yaml.safe_load((DOCKER / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = [rule["expr"]]
    return exprs


def test_dashboard_and_alerts_name_only_metrics_the_server_exports():
    with run_server() as url:
        # a completion and a session, so every family has been touched at least once
        body = {"prompt": "Hello", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert httpx.post(url + "/v1/sessions", json={"prompt": "Hi"}, timeout=60).status_code == 201
        text = httpx.get(url + "/metrics", timeout=10).text
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        exported.update(sample.name for sample in family.samples)
    exprs = _expressions()
    named = {(where, m) for where, es in exprs.items() for e in es for m in METRIC_RE.findall(e)}
    assert len({m for _, m in named}) >= 15  # the dashboard covers latency, tokens, batch, sessions, store
    missing = sorted(f"{where}: {m}" for where, m in named if m not in exported)
    assert not missing, "not in the server's /metrics:\n" + "\n".join(missing)
