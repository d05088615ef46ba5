"""Continual pre-training (CPT): the recipe, top to bottom.

causal-LM loss (or a mix with forward KL to a teacher, whose top-k log-probabilities can be
computed once and read from disk: `teacher_cache`) + Switch load-balancing loss + optional
router z-loss; AdamW, warm-up then cosine; gradient accumulation and clipping; bf16 autocast
or fp32. A bf16 checkpoint trains in bf16 (weights and compute; fp32 Adam moments and stochastic
rounding: `bf16_adamw`) unless `--weights-dtype fp32`; a teacher is held as stored and computes in
fp32. Under `torchrun`/`accelerate launch` each rank takes its share of the micro-batches of every
global batch (DDP), so the loss curve does not depend on the number of processes.

Stage 5, train: the loop (here), what a run is given and trains (`config`), what it leaves behind (`log`),
training checkpoints (`checkpoints`), FSDP (`fsdp`), the device (`device`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from d2m_export.errors import UserError
from d2m_export.outputs import MARKER, GENERATOR, check_output_dir
from d2m_export.sources.data import batch_indices, pack
from d2m_export.sources.models import load_fp32_compute, load_model, model_label, read_record, resolve_model
from d2m_export.sources.shards import ShardChunks, stream_batch_indices
from d2m_export.train import checkpoints
from d2m_export.train import device as devices, fsdp
from d2m_export.train.bf16_adamw import BF16AdamW
from d2m_export.train.config import (TORCH_DTYPES, TrainConfig, check_train_memory, resolve_weights_dtype,
                                     select_trainable)
from d2m_export.train.log import TrainLog, finish
from d2m_export.train.teacher_cache import TeacherTopK, default_root, full_kl, topk_kl

class Routers:
    """Forward hooks on every MoE router: its logits and top-k choices of the last forward."""

    def __init__(self, model):
        self.routers = [m for name, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]
        self.logits: list[torch.Tensor] = []
        self.chosen: list[torch.Tensor] = []
        self.hooks = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, out):
        self.logits.append(out[0])
        self.chosen.append(out[-1])

    def clear(self):
        self.logits, self.chosen = [], []


def balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style N·Σ f_i·P_i, averaged over MoE layers."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, n).sum(1).float()
        losses.append(n * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(x.float(), -1).pow(2).mean() for x in router_logits]).mean()


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fingerprint(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]


def _dist(fsdp: bool = False, device: str = "cpu"):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or fsdp) and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = torch.distributed.get_rank() if world > 1 or fsdp else 0
    return world, rank


def train(cfg: TrainConfig) -> dict:
    if cfg.fsdp:
        fsdp.check_launcher()
    weights_dtype = resolve_weights_dtype(cfg)
    device, dtype = devices.resolve(cfg.device, "bf16" if weights_dtype == "bf16" else cfg.dtype)
    cfg = replace(cfg, device=device, dtype=dtype, weights_dtype=weights_dtype)
    world, rank = _dist(cfg.fsdp, device)
    started = time.time()
    out = Path(cfg.out)
    if cfg.global_batch % (cfg.micro_batch * world):
        raise UserError(f"--global-batch {cfg.global_batch} must be a multiple of --micro-batch {cfg.micro_batch} "
                        f"× {world} processes")
    if cfg.resume and not checkpoints.checkpoint_dirs(out):
        raise UserError(f"--resume: no checkpoint in {out}/checkpoints")
    if not cfg.resume:
        check_output_dir(out)
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} already holds a training run; pass --resume or choose a new --out")
    if cfg.data:                      # bad shards are refused before the model loads
        from transformers import AutoTokenizer

        ShardChunks(Path(cfg.data), cfg.seq_len, AutoTokenizer.from_pretrained(resolve_model(cfg.model)))
    check_train_memory(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_dir = load_model(cfg.model, dtype=TORCH_DTYPES[cfg.weights_dtype])
    model.to(device)
    read_record(model_dir)            # a damaged d2m_plan.json is refused now, not after training
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and cfg.seq_len > max_len:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's maximum context of {max_len}")
    if cfg.teacher_topk and not cfg.distill_from:
        raise UserError("--teacher-topk caches a teacher's logits; it needs --distill-from")
    if cfg.teacher_topk < 0 or cfg.teacher_topk > model.config.vocab_size:
        raise UserError(f"--teacher-topk must be between 1 and the vocabulary size {model.config.vocab_size}, "
                        f"not {cfg.teacher_topk}")
    teacher = teacher_dir = None
    if cfg.distill_from:
        teacher, _, teacher_dir = load_fp32_compute(cfg.distill_from)    # the same logits as in fp32
        teacher.to(device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise UserError(f"--distill-from: teacher vocabulary {teacher.config.vocab_size} differs from "
                            f"the student's {model.config.vocab_size}")
    if cfg.data:
        chunks = ShardChunks(Path(cfg.data), cfg.seq_len, tokenizer)
        order = stream_batch_indices
    else:
        chunks, order = pack(tokenizer, cfg.corpora, cfg.seq_len), batch_indices
    params = select_trainable(model, cfg.train_only)
    steps = max(1, cfg.tokens // (cfg.global_batch * cfg.seq_len))
    cache, teacher_runs = None, None
    if cfg.teacher_topk:          # the teacher once, on every chunk this run will see; then it is not needed
        needed = torch.cat([order(len(chunks), s, cfg.global_batch, cfg.seed) for s in range(steps)])
        cache = TeacherTopK(Path(cfg.teacher_cache) if cfg.teacher_cache else default_root(), teacher_dir, chunks,
                            cfg.teacher_topk)
        if rank == 0:
            teacher_runs = cache.fill(teacher, chunks, needed.tolist(), cfg.micro_batch, cfg.progress)
        if world > 1:
            torch.distributed.barrier()
            cache = TeacherTopK(cache.dir.parent, teacher_dir, chunks, cfg.teacher_topk)   # the filled state
        teacher = None
    meta = {"base_model": model_label(cfg.model), "base_fingerprint": fingerprint(model_dir),
            "seq_len": cfg.seq_len, "global_batch": cfg.global_batch, "seed": cfg.seed,
            **({"data": chunks.digest()[:16]} if cfg.data else {"corpora": cfg.corpora}),
            "train_only": cfg.train_only,
            **({"weights_dtype": "bf16"} if cfg.weights_dtype == "bf16" else {})}   # older fp32 runs resume
    if rank == 0 and not cfg.resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(f"{GENERATOR} train (running)\n")
    routers = Routers(model)
    stats_before = None
    if rank == 0 and routers.routers:     # on the whole model, before any sharding
        before_file = out / ".router_load_before.json"
        if cfg.resume and before_file.is_file():
            stats_before = json.loads(before_file.read_text())
        else:
            stats_before = router_load(model, routers, chunks, cfg)
            before_file.write_text(json.dumps(stats_before))
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.fsdp:
        fsdp.shard(model, cfg.dtype, device)
        # the sharded parameters now, less the unsharded empty ones (the optimizer and the gradient
        # norm take DTensors only)
        params = select_trainable(model, cfg.train_only, frozen=fsdp.empty_params(model))
    if cfg.weights_dtype == "bf16":
        optimizer = BF16AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, seed=cfg.seed)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, steps))
    start = 0
    if cfg.resume:
        start = fsdp.load_latest(out, model, optimizer, scheduler, meta, checkpoints.check_meta) if cfg.fsdp \
            else checkpoints.load_latest(out, model, optimizer, scheduler, meta)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    if cfg.compile:
        ddp = torch.compile(ddp)
    per_token = devices.flops_per_token(model.config, cfg.seq_len)
    peak, peak_source = devices.peak_flops(device, cfg.dtype, cfg.peak_tflops) if rank == 0 else (None, "")
    log = TrainLog(out, enabled=rank == 0, start=start)
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    micro = cfg.global_batch // cfg.micro_batch
    bar = _progress(cfg, steps, start, rank)
    for step in range(start, steps):
        t0 = time.time()
        idx = order(len(chunks), step, cfg.global_batch, cfg.seed).view(micro, cfg.micro_batch)
        mine = idx[rank::world]
        sums = torch.zeros(4)
        for i, mb in enumerate(mine):
            sync = i == len(mine) - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            ctx = ddp.no_sync() if world > 1 and not cfg.fsdp and not sync else _null()
            with ctx:
                cached = cache.get(mb, device) if cache is not None else None
                parts = _loss(ddp, teacher, routers, chunks[mb].to(device), cfg, top_k, cached)
                (parts[0] / len(mine)).backward()
            sums += torch.stack([p.detach().float() for p in parts]).cpu() / len(mine)
        if world > 1:
            torch.distributed.all_reduce(sums)
            sums /= world
        grad_norm = fsdp.clip_grad_norm(params, cfg.grad_clip) if cfg.fsdp \
            else torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_s = cfg.global_batch * cfg.seq_len / (time.time() - t0)
        row = {"step": step + 1, "loss": sums[0].item(), "ce": sums[1].item(), "balance": sums[2].item(),
               "distill_kl": sums[3].item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens": (step + 1) * cfg.global_batch * cfg.seq_len, "tokens_per_s": tokens_s}
        if peak:
            row["mfu"] = tokens_s * per_token / (peak * world)
        log.write(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_s:.0f}")
            bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            if cfg.fsdp:
                fsdp.save(out, step + 1, model, optimizer, scheduler, meta, cfg.keep_last)
            elif rank == 0:
                checkpoints.save(out, step + 1, model, optimizer, scheduler, meta, cfg.keep_last)
            if world > 1:
                torch.distributed.barrier()
    if bar is not None:
        bar.close()
    result = {"steps": steps, "tokens": steps * cfg.global_batch * cfg.seq_len,
              "wall_s": round(time.time() - started, 1), "flops_per_token": per_token,
              "peak_flops": peak, "peak_flops_source": peak_source}
    if cache is not None:
        result["teacher_topk"] = {"k": cfg.teacher_topk, "cache": str(cache.dir), "chunks_computed": teacher_runs,
                                  "mass": round(cache.mass(needed.tolist()), 4)}
    if cfg.fsdp:                  # the whole model, gathered on rank 0, is what gets evaluated and saved
        model = fsdp.gathered(model)
        routers = Routers(model) if model is not None else routers
    if rank == 0:
        stats_after = router_load(model, routers, chunks, cfg) if routers.routers else None
        finish(out, model, tokenizer, model_dir, cfg, meta, result, stats_before, stats_after)
        log.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _progress(cfg, steps, start, rank):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=steps, initial=start, desc="training", unit="step")


def _loss(model, teacher, routers, x, cfg: TrainConfig, top_k: int, cached=None):
    routers.clear()
    # bf16 under FSDP is its mixed-precision policy (bf16 weights and compute), not autocast
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16" and not cfg.fsdp):
        logits = model(input_ids=x, use_cache=False).logits.float()       # [B, T, V]
    # next-token targets with the last position ignored: slicing the logits instead would copy
    # the whole [B, T-1, V] tensor (200 MB at 4 x 256 x 49k) on every micro-batch
    target = F.pad(x[:, 1:], (0, 1), value=-100)
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    balance = balance_loss(routers.logits, top_k) if routers.logits else zero
    kl = zero
    if teacher is not None or cached is not None:
        if cached is not None:
            kl = topk_kl(logits[:, :-1], *cached)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1]
            kl = full_kl(logits[:, :-1], t_logits)
        loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl
    else:
        loss = ce
    loss = loss + cfg.balance_loss_weight * balance
    if cfg.z_loss_weight and routers.logits:
        loss = loss + cfg.z_loss_weight * z_loss(routers.logits)
    return loss, ce, balance, kl


@torch.no_grad()
def router_load(model, routers: Routers, chunks: torch.Tensor, cfg: TrainConfig, n: int = 8) -> list[list[float]]:
    """Fraction of routed token slots each expert receives, per MoE layer, on the first n chunks."""
    was_training = model.training
    model.eval()
    routers.clear()
    model(input_ids=chunks[:n].to(model.device), use_cache=False, logits_to_keep=1)   # routing only: no logits
    load = []
    for chosen in routers.chosen:
        counts = torch.bincount(chosen.reshape(-1), minlength=routers.routers[0].num_experts).float()
        load.append([round(v, 4) for v in (counts / counts.sum()).tolist()])
    routers.clear()
    model.train(was_training)
    return load
