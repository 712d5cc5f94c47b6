"""The training loop: one CPU, one GPU, or many GPUs under torchrun (DDP, switched on by its env vars).

    python -m training train --config small                       # one process
    torchrun --nproc_per_node 2 -m training train --config small  # DDP (gloo on CPU, nccl on GPU)

bf16 autocast on CUDA, fp32 on CPU; gradient accumulation (gradients synchronised on the last
micro-step only); AdamW with linear warm-up and cosine decay; gradient clipping; periodic validation
loss and a text sample; checkpoints that resume exactly; JSON-lines logs (+ TensorBoard if installed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.checkpoint import save_pretrained
from model.config import preset as retnet_preset
from model.retnet import RetNet
from model.tokenizer import Tokenizer
from model.transformer import GPTBaseline
from model.transformer import preset as baseline_preset
from training.config import TrainConfig
from training.data import load_tokens
from training.evaluate import LossModule, eval_loss, sample_text
from training.trainer_state import load_checkpoint, save_checkpoint


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """DDP when torchrun's environment variables are present; a single process otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def load_loss_mask(data_dir: str | Path, split: str, n_tokens: int) -> np.ndarray | None:
    """`<split>.mask.bin` (uint8 per token, 0 = not a target) when the data directory has one."""
    path = Path(data_dir) / f"{split}.mask.bin"
    if not path.is_file():
        return None
    mask = np.memmap(path, dtype=np.uint8, mode="r")
    if len(mask) != n_tokens:
        raise ValueError(f"{path} has {len(mask)} entries for {n_tokens} tokens; write it again")
    return mask


def get_batch(
    tokens: np.ndarray,
    cfg: TrainConfig,
    step: int,
    micro: int,
    rank: int,
    device: torch.device,
    loss_mask: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows drawn from a generator seeded by (seed, step, micro-step, rank): the data
    position is a function of the step, so a resumed run reads exactly what it would have read.
    With `loss_mask`, targets whose mask is 0 become -100 (cross_entropy's ignore_index)."""
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, rank)) & (2**62 - 1))
    hi = len(tokens) - cfg.seq_len - 1
    if hi <= 0:
        raise ValueError(f"training split has {len(tokens)} tokens; seq_len {cfg.seq_len} needs more")
    starts = torch.randint(0, hi, (cfg.batch_size,), generator=g).tolist()
    batch = torch.from_numpy(np.stack([tokens[s : s + cfg.seq_len + 1].astype(np.int64) for s in starts]))
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    if loss_mask is not None:
        m = torch.from_numpy(np.stack([loss_mask[s + 1 : s + cfg.seq_len + 1] for s in starts]))
        y = y.masked_fill(m == 0, -100)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> nn.Module:
    overrides = {"vocab_size": vocab_size, "eos_token_id": eos_id, **cfg.model_overrides}
    if cfg.arch == "retnet":
        return RetNet(retnet_preset(cfg.preset, **overrides))
    return GPTBaseline(baseline_preset(cfg.preset, **overrides))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


class Logger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run training; returns the final record (step, losses, tokens, wall time)."""
    device_type = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device_type = "cpu" if device_type == "auto" else device_type
    d = setup_distributed(device_type)
    device = torch.device(f"cuda:{d.local_rank}" if device_type == "cuda" else device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    train_tokens, val_tokens = load_tokens(cfg.data_dir, "train"), load_tokens(cfg.data_dir, "val")
    train_mask = load_loss_mask(cfg.data_dir, "train", len(train_tokens))
    tok_dir = Path(cfg.tokenizer_dir)
    tokenizer = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.tiktoken").is_file() else None
    meta = json.loads((Path(cfg.data_dir) / "tokens.json").read_text())
    vocab = tokenizer.vocab_size if tokenizer else int(meta.get("vocab_size", 0)) or None
    if vocab is None:
        raise ValueError(f"no tokenizer in {tok_dir} and no vocab_size in {cfg.data_dir}/tokens.json")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab, tokenizer.eos_id if tokenizer else None).to(device)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    start_step, tokens_seen = 0, 0
    ckpt_dir = out_dir / "checkpoint"
    if resume and (ckpt_dir / "trainer_state.json").is_file():
        saved = load_checkpoint(ckpt_dir, model, optimizer)
        start_step, tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
    loss_module: nn.Module = LossModule(model, cfg.retention_mode, cfg.chunk_size)
    if cfg.compile:
        loss_module = torch.compile(loss_module)
    if d.world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[d.local_rank] if device.type == "cuda" else None
        )
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    logger = Logger(out_dir, d.main, cfg.tensorboard)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world
    if d.main:
        logger.log(
            {
                "event": "start",
                "step": start_step,
                "params": sum(p.numel() for p in model.parameters()),
                "world": d.world,
                "device": str(device),
                "tokens_per_step": tokens_per_step,
            }
        )

    def checkpoint(step: int, record: dict[str, Any]) -> None:
        if d.main:
            save_checkpoint(
                ckpt_dir,
                model,
                optimizer,
                {"step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict(), **record},
                tok_dir if tokenizer else None,
            )

    def evaluate(step: int) -> dict[str, Any]:
        res = eval_loss(
            model,
            val_tokens,
            cfg.seq_len,
            cfg.batch_size,
            cfg.eval_batches,
            device,
            cfg.retention_mode,
            torch.bfloat16 if device.type == "cuda" else None,
        )
        rec: dict[str, Any] = {"step": step, "val_loss": res["loss"], "val_ppl": res["ppl"]}
        if tokenizer is not None and cfg.sample_tokens > 0:
            rec["sample"] = sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=step)
        logger.log(rec)
        return rec

    t_start = time.time()
    last: dict[str, Any] = {"step": start_step}
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not d.main, unit="step", dynamic_ncols=True)
    model.train()
    step = start_step
    while step < cfg.max_steps:
        t0 = time.time()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_tokens, cfg, step, micro, d.rank, device, train_mask)
            sync = micro == cfg.grad_accum - 1
            no_sync = loss_module.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
            with no_sync:
                with autocast or contextlib.nullcontext():
                    loss = loss_module(x, y) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}")
        last = {
            "step": step,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_seen": tokens_seen,
            "tokens_per_s": tokens_per_step / dt,
            "elapsed_s": time.time() - t_start,
        }
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            logger.log(last)
        out_of_time = (cfg.max_minutes > 0 and (time.time() - t_start) > cfg.max_minutes * 60) or (
            step == cfg.stop_at_step
        )
        if d.world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if d.main and (
            (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps or out_of_time
        ):
            last.update(evaluate(step))
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_steps or out_of_time:
            checkpoint(step, last)
        if out_of_time:
            break
    bar.close()
    if d.main:
        save_pretrained(model, out_dir / "model")  # type: ignore[arg-type]
        if tokenizer is not None:
            tokenizer.save(out_dir / "model")
        logger.log({"event": "end", **{k: v for k, v in last.items() if k != "sample"}})
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last
