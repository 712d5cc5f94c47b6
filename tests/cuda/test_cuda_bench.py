"""bench/bench_gpu.py in its smoke mode on each device: it runs, times every case and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.cuda.common import DEVICES

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("device", DEVICES)
def test_bench_smoke(device, tmp_path):
    out_path = tmp_path / "bench.json"
    argv = ["--device", device, "--tiny", "--rows", "1,4", "--prefill", "64,256", "--steps", "2"]
    out = _bench().main([*argv, "--repeats", "1", "--json", str(out_path)])
    assert json.loads(out_path.read_text()) == out
    assert out["preset"] == "tiny" and out["dtype"] == "bfloat16" and out["device"] == device
    assert [d["rows"] for d in out["decode"]] == [1, 4]
    for d in out["decode"]:
        assert d["ms_per_step"] > 0 and d["tokens_per_s"] > 0
        # the roofline counts the weights once and each row's fp32 state twice (read + written)
        assert d["roofline_ms"] > d["roofline_weights_ms"] > 0
        assert d["state_bytes"] == d["rows"] * 2 * 2 * 16 * 32 * 4  # tiny: 2 layers, 2 heads, 16 x 32
    assert [p["tokens"] for p in out["prefill"]] == [64, 256]
    assert all(p["tokens_per_s"] > 0 and p["linear_tflops"] > 0 for p in out["prefill"])


def test_bench_rejects_bad_arguments(capsys):
    bench = _bench()
    for argv, message in [
        (["--bandwidth-gbs", "0"], "--bandwidth-gbs must be positive"),
        (["--rows", "8,x"], "comma-separated integers"),
        (["--device", "tpu9"], "is not a device"),
    ]:
        with pytest.raises(SystemExit):
            bench.parse_args([*argv, "--device", "cpu"] if "--device" not in argv else argv)
        assert message in capsys.readouterr().err
