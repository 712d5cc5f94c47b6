"""Imports go one way (model <- training, state_store <- server); clients use HTTP; no fastapi in engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "training", "state_store", "server", "clients")

# What each top-level package may import from the project (besides itself).
ALLOWED = {
    "model": set(),
    "training": {"model"},
    "state_store": {"model"},
    "server": {"model", "state_store"},
    "clients": set(),
}
# Third-party modules model/ may use: it must stay a torch-only library.
MODEL_THIRD_PARTY = {"torch", "safetensors", "tiktoken", "tokenizers", "jinja2"}  # HF model dirs


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _relative_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} from {'.' * node.level}{node.module or ''} import ..."
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_go_one_way(pkg):
    bad = []
    for f in _files(pkg):
        for name in _imports(f):
            top = name.split(".")[0]
            if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_model_is_torch_only():
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad = []
    for f in _files("model"):
        for name in _imports(f):
            top = name.split(".")[0]
            if top not in stdlib and top not in MODEL_THIRD_PARTY and top != "model" and top != "__future__":
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_engine_has_no_fastapi():
    bad = [
        f"{f.relative_to(ROOT)} imports {n}"
        for f in _files("server/engine")
        for n in _imports(f)
        if n.split(".")[0] in ("fastapi", "starlette", "uvicorn")
    ]
    assert not bad, "\n".join(bad)


def test_engine_does_not_import_the_server():
    """server/engine/ knows token ids and tensors only: no routes, settings, protocol models or app."""
    bad = [
        f"{f.relative_to(ROOT)} imports {n}"
        for f in _files("server/engine")
        for n in _imports(f)
        if n.startswith("server.") and not n.startswith("server.engine")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", (*PACKAGES, "tests", "bench"))
def test_no_relative_imports(pkg):
    """Absolute imports only: a module's dependencies are greppable and the layout checks above see them."""
    bad = [line for f in _files(pkg) for line in _relative_imports(f)]
    assert not bad, "use absolute imports:\n" + "\n".join(bad)


def test_modules_stay_small():
    big = [
        f"{f.relative_to(ROOT)}: {n} lines"
        for pkg in PACKAGES
        for f in _files(pkg)
        if (n := len(f.read_text().splitlines())) > 550
    ]
    assert not big, "split these modules by responsibility:\n" + "\n".join(big)
