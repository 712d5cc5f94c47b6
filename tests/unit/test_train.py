"""The training loop: loss falls, resume is exact, torchrun (gloo, 2 processes) trains and checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import from_pretrained, load_baseline
from tests.support.bpe import make_test_tokenizer
from training.config import TrainConfig, TrainConfigError, absolute_path, parse_overrides
from training.data import load_tokens, prepare_files, tokenize_corpus
from training.evaluate import eval_loss
from training.train import build_model, lr_at, train

ROOT = Path(__file__).resolve().parents[2]

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the captain", "a small bird"]
VERBS = ["sees", "likes", "follows", "finds", "calls", "watches"]
OBJECTS = ["the sea", "a red ball", "the ship", "an apple", "the moon", "a green door"]


def _write_corpus(root: Path, docs: int = 60, seed: int = 0) -> Path:
    """Small learnable English: sentences from a tiny grammar, one document per file."""
    rng = random.Random(seed)
    src = root / "txt"
    src.mkdir()
    for d in range(docs):
        sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(40)]
        (src / f"doc{d:03d}.txt").write_text(" ".join(sents).capitalize() + "\n")
    return src


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    src = _write_corpus(root)
    corpus = root / "corpus"
    prepare_files(str(src / "*.txt"), corpus, val_fraction=0.1)
    tok = make_test_tokenizer()
    tok_dir = root / "tokenizer"
    tok.save(tok_dir)
    tokenize_corpus(corpus, tok, corpus / "tokens", progress=False)
    return {"root": root, "tokens": corpus / "tokens", "tokenizer": tok_dir}


def _cfg(data_dirs, out: Path, **kw) -> TrainConfig:
    base = dict(
        preset="tiny",
        data_dir=str(data_dirs["tokens"]),
        tokenizer_dir=str(data_dirs["tokenizer"]),
        out_dir=str(out),
        seq_len=64,
        batch_size=8,
        max_steps=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=30,
        eval_batches=4,
        ckpt_interval=30,
        log_interval=1,
        sample_tokens=8,
        tensorboard=False,
        threads=1,
    )
    return TrainConfig.from_dict({**base, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_validation_loss_falls(data_dirs, tmp_path):
    cfg = _cfg(data_dirs, tmp_path / "run")
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg, make_test_tokenizer().vocab_size, None)
    before = eval_loss(fresh, load_tokens(data_dirs["tokens"], "val"), 64, 8, 4)["loss"]
    last = train(cfg)
    assert last["step"] == 60
    log = _log(tmp_path / "run")
    vals = [r["val_loss"] for r in log if "val_loss" in r and "event" not in r]
    assert len(vals) == 2
    # Stated margin: at least 1.5 nats below the untrained model after 60 steps (~30k tokens).
    assert vals[-1] < before - 1.5, (before, vals)
    assert all(isinstance(r["sample"], str) for r in log if "val_loss" in r and "event" not in r)
    # the final model directory loads through the model core's loader, tokenizer included
    model = from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == make_test_tokenizer().vocab_size
    assert (tmp_path / "run" / "model" / "tokenizer.tiktoken").is_file()


def test_resume_is_exact(data_dirs, tmp_path):
    steps = 16
    full = tmp_path / "full"
    train(_cfg(data_dirs, full, max_steps=steps, ckpt_interval=0, eval_interval=0))
    part = tmp_path / "part"
    train(_cfg(data_dirs, part, max_steps=steps, ckpt_interval=0, eval_interval=0, stop_at_step=8))
    ckpt = json.loads((part / "checkpoint" / "trainer_state.json").read_text())
    assert ckpt["step"] == 8
    train(_cfg(data_dirs, part, max_steps=steps, ckpt_interval=0, eval_interval=0), resume=True)
    a = {r["step"]: r["loss"] for r in _log(full) if "loss" in r and "event" not in r}
    b = {r["step"]: r["loss"] for r in _log(part) if "loss" in r and "event" not in r}
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(9, steps + 1):  # every step after the resume, the next one first
        assert a[s] == b[s], (s, a[s], b[s])
    wa = from_pretrained(full / "model").lm_head.weight
    wb = from_pretrained(part / "model").lm_head.weight
    assert torch.equal(wa, wb)


def test_transformer_baseline_trains(data_dirs, tmp_path):
    cfg = _cfg(data_dirs, tmp_path / "gpt", arch="transformer", max_steps=20, eval_interval=20)
    last = train(cfg)
    assert last["val_loss"] < 5.0
    model = load_baseline(tmp_path / "gpt" / "model")
    assert model.num_parameters() > 0


@pytest.mark.slow  # subprocesses / compilation: `make test` runs it, `make test-fast` does not
def test_torchrun_two_processes(data_dirs, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port),
        "-m", "training", "train", "--config", str(ROOT / "training/configs/tiny.yaml"), "--set",
        f"data_dir={data_dirs['tokens']}", f"tokenizer_dir={data_dirs['tokenizer']}", f"out_dir={out}",
        "max_steps=6", "eval_interval=6", "ckpt_interval=6", "log_interval=1", "sample_tokens=4", "threads=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Own process group, so that a hang kills the workers too, not only the launcher.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    log = _log(out)
    start = next(r for r in log if r.get("event") == "start")
    assert start["world"] == 2 and start["tokens_per_step"] == 2 * 8 * 64
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == [1, 2, 3, 4, 5, 6]  # rank 0 only
    ckpts = list(out.glob("checkpoint*"))
    assert [p.name for p in ckpts] == ["checkpoint"]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    from_pretrained(out / "checkpoint")


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_config_errors_and_overrides(tmp_path):
    with pytest.raises(TrainConfigError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(TrainConfigError, match="arch"):
        TrainConfig(arch="lstm")
    with pytest.raises(TrainConfigError, match="no training config"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    assert parse_overrides(["lr=3e-4", "compile=true", "seq_len=128"]) == {
        "lr": 3e-4,
        "compile": True,
        "seq_len": 128,
    }
    assert TrainConfig.from_yaml("small").preset == "small"


def test_cli_paths_do_not_depend_on_the_working_directory(data_dirs, tmp_path, monkeypatch, capsys):
    """Issue 17: the CLI makes every path absolute where it enters (arguments, defaults, the config's
    directories), so a later step run from elsewhere (export, eval) still finds what the run used."""
    from training.cli import main

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(data_dirs["tokens"], work / "data" / "tokens")
    shutil.copytree(data_dirs["tokenizer"], work / "data" / "tok")
    cfg = _cfg(data_dirs, Path("runs/r"), data_dir="data/tokens", tokenizer_dir="data/tok", max_steps=4)
    (work / "cfg").mkdir()
    (work / "cfg" / "run.yaml").write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    elsewhere.mkdir()

    monkeypatch.chdir(work)
    main(["train", "--config", "cfg/run.yaml", "--set", "eval_interval=4", "ckpt_interval=0"])
    recorded = json.loads((work / "runs" / "r" / "train_config.json").read_text())
    for key, rel in (("data_dir", "data/tokens"), ("tokenizer_dir", "data/tok"), ("out_dir", "runs/r")):
        assert Path(recorded[key]).is_absolute(), (key, recorded[key])
        assert Path(recorded[key]).resolve() == (work / rel).resolve()

    monkeypatch.chdir(elsewhere)  # the run's relative paths mean nothing here
    main(["export", "--run", str(work / "runs" / "r"), "--out", "shipped", "--eval-batches", "1"])
    assert from_pretrained(elsewhere / "shipped").config.vocab_size == make_test_tokenizer().vocab_size
    capsys.readouterr()
    main(["eval", "--model", "shipped", "--data", str(work / "data" / "tokens"), "--max-batches", "1"])
    res = json.loads(capsys.readouterr().out)
    assert Path(res["model"]).resolve() == (elsewhere / "shipped").resolve() and res["loss"] > 0

    assert absolute_path("a/../b", base="/x") == Path("/x/b")
    assert absolute_path("~/c") == Path.home() / "c"
    assert TrainConfig(out_dir="/abs/run").resolved(base="/x").out_dir == "/abs/run"
    assert TrainConfig(data_dir="d").resolved(base="/x").data_dir == "/x/d"


def test_export_writes_a_shippable_directory(data_dirs, tmp_path):
    from training.export import export_run

    run = tmp_path / "run"
    train(_cfg(data_dirs, run, max_steps=12, eval_interval=6, ckpt_interval=0))
    out = tmp_path / "shipped"
    figures = export_run(run, out, dtype="bfloat16", command="python -m training train --config tiny")
    model = from_pretrained(out)
    assert (out / "model.safetensors").stat().st_size < (run / "model" / "model.safetensors").stat().st_size
    assert figures["steps"] == 12 and figures["tokens_seen"] == 12 * 8 * 64
    card = (out / "README.md").read_text()
    assert f"{figures['val_loss_exported']:.3f}" in card and "python -m training train --config tiny" in card
    assert model.config.eos_token_id == make_test_tokenizer().eos_id


@pytest.mark.slow  # subprocesses / compilation: `make test` runs it, `make test-fast` does not
def test_compare_writes_table_and_plot(data_dirs, tmp_path):
    import yaml

    from training.compare import run_comparison

    cfg = _cfg(data_dirs, tmp_path / "cmp").to_dict()
    cfg.update(max_steps=6, eval_interval=3, ckpt_interval=0, sample_tokens=0)
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(cfg))
    docs = tmp_path / "docs"
    res = run_comparison(str(tmp_path / "cmp.yaml"), tmp_path / "cmp", docs, contexts=[8, 32])
    assert set(res) == {"retnet", "transformer"}
    assert abs(res["retnet"]["params"] - res["transformer"]["params"]) / res["retnet"]["params"] < 0.05
    assert (docs / "compare.png").stat().st_size > 1000
    table = (docs / "compare.md").read_text()
    assert "decode ms/token @ 32" in table and "final val loss" in table
