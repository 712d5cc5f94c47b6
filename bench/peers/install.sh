#!/usr/bin/env bash
# Install the peers of bench/bench_peers.py into the given interpreter's environment (never needed to serve):
#   - the project's optional `bench` extra (transformers, for Hugging Face's GPT-2);
#   - torchscale 0.3.0 (Microsoft's official RetNet) without its pinned dependencies (they would pull
#     timm -> torchvision and an old fairscale); it truly imports only torch, numpy and fairscale.nn,
#     and timm.models.layers.drop_path, which bench/peers/stubs/timm provides (bench_peers.py puts it
#     on sys.path only when timm is not installed).
# Usage: bash bench/peers/install.sh [python]   (make bench-peers)
set -euo pipefail
PY="${1:-.venv/bin/python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$PY" -m pip install -q -e "$ROOT[bench]"
"$PY" -m pip install -q --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
PYTHONPATH="$ROOT/bench/peers/stubs${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import torchscale.architecture.retnet, transformers; print('peers ready: torchscale 0.3.0, transformers', transformers.__version__)"
