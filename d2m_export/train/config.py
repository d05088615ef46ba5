"""What a training run is given (`TrainConfig`), the memory it needs, and which parameters it trains."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2m_export.errors import UserError
from d2m_export.sources.data import DEFAULT_TRAIN_CORPORA
from d2m_export.sources.memory import RUNTIME_BYTES, check_memory, logits_bytes, weight_bytes
from d2m_export.sources.models import resolve_model, stored_dtype


@dataclass
class TrainConfig:
    model: str
    out: str
    corpora: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_CORPORA))
    data: str | None = None          # token shards (`d2m-export tokenize`), streamed instead of `corpora`
    tokens: int = 200_000
    seq_len: int = 256
    micro_batch: int = 4
    global_batch: int = 16           # sequences per optimizer step, over all processes
    lr: float = 3e-4                 # lr, warm-up and distill_weight: bench/results/cpt_defaults.md
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "auto"              # fp32 | bf16 (autocast; under FSDP, bf16 weights) | auto: bf16 on CUDA
    weights_dtype: str = "auto"      # fp32 | bf16 (fp32 Adam moments, stochastic rounding) | auto: as stored
    device: str = "auto"             # cpu | cuda | auto: CUDA when present
    compile: bool = False            # torch.compile the model
    peak_tflops: float | None = None  # for MFU (default: data sheet on CUDA, a matmul probe on the CPU)
    seed: int = 0
    train_only: str = "all"          # all | moe | router
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    distill_from: str | None = None
    distill_weight: float = 0.5      # loss = (1 - w)·CE + w·KL(teacher || student) when distilling
    teacher_topk: int = 0            # > 0: the teacher's top-k log-probs, computed once and cached on disk
    teacher_cache: str | None = None  # where (default: the d2m-export cache)
    save_every: int = 50
    keep_last: int = 2
    resume: bool = False
    fsdp: bool = False               # shard weights, gradients and Adam state over the processes (FSDP2)
    activation_checkpointing: bool = False   # recompute each layer's activations in the backward pass
    progress: bool = True


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def resolve_weights_dtype(cfg: TrainConfig) -> str:
    """fp32 or bf16: `auto` keeps a bf16 checkpoint in bf16 (an fp16 or fp32 one trains in fp32)."""
    if cfg.weights_dtype not in ("auto", "fp32", "bf16"):
        raise UserError(f"--weights-dtype must be auto, fp32 or bf16, not {cfg.weights_dtype!r}")
    weights = cfg.weights_dtype
    if weights == "auto":
        weights = "bf16" if stored_dtype(resolve_model(cfg.model)) == "bfloat16" and not cfg.fsdp else "fp32"
    if weights == "bf16" and cfg.fsdp:
        raise UserError("--fsdp keeps fp32 weights and has its own bf16 policy: use --dtype bf16 with "
                        "--weights-dtype fp32")
    if weights == "bf16" and cfg.dtype == "fp32":
        raise UserError("--weights-dtype bf16 computes in bf16: drop --dtype fp32, or train fp32 weights "
                        "with --weights-dtype fp32")
    return weights


def train_memory_need(cfg: TrainConfig, train_only: str | None = None) -> tuple[int, str]:
    """The estimated peak of a single-process run (bytes) and what it counts: the student's weights;
    gradients and two fp32 Adam moments for the weights it trains (`train_only`, by default the
    run's); the teacher as stored; a micro-batch's logits."""
    train_only = train_only or cfg.train_only
    model_dir = resolve_model(cfg.model)
    dtype = TORCH_DTYPES[cfg.weights_dtype]
    per_param = 2 if dtype == "bfloat16" else 4
    # × 1.2: what the allocator keeps of the forward and backward passes, beyond the optimizer's state
    # (bench/results/scale.md, bf16, 1 × 256 tokens: × 1.13 at the Llama-3.2-1B shape training all,
    # × 1.16 at the Qwen2.5-3B shape training the MoE layers)
    need = int(1.2 * (weight_bytes(model_dir, dtype) + trainable_count(model_dir, train_only) * (per_param + 8)))
    how = f"{cfg.weights_dtype} weights; gradients and fp32 Adam moments of the weights trained ({train_only})"
    if cfg.distill_from:
        teacher_dir = resolve_model(cfg.distill_from)
        need += weight_bytes(teacher_dir, stored_dtype(teacher_dir))
        how += ", the teacher as stored"
    # the student's logits, their gradient and log-softmax, and the teacher's
    need += 4 * logits_bytes(model_dir, cfg.micro_batch, cfg.seq_len, "float32")
    return need, how + f" and {cfg.micro_batch} × {cfg.seq_len}-token logits"


def check_train_memory(cfg: TrainConfig) -> None:
    """Refuse before loading when `train_memory_need` exceeds the memory available, saying what
    training the MoE layers alone would need. Single-process runs only: ranks on one machine share
    its memory, and FSDP shards the state."""
    if cfg.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    need, how = train_memory_need(cfg)
    other_ways = ""
    if cfg.train_only == "all" and trainable_count(resolve_model(cfg.model), "moe"):
        other_ways = (f"train the MoE layers alone (--train-only moe: about "
                      f"{(train_memory_need(cfg, 'moe')[0] + RUNTIME_BYTES) / 2**30:.1f} GiB)")
    check_memory(resolve_model(cfg.model), "train", need, how, other_ways)


TRAINED = {"all": lambda n: True,
           "moe": lambda n: ".mlp.gate." in n or ".mlp.experts." in n or ".mlp.shared_expert" in n,
           "router": lambda n: ".mlp.gate." in n}


@functools.lru_cache(maxsize=8)      # the memory check asks for the same counts more than once
def trainable_count(model_dir: Path, train_only: str) -> int:
    """The parameters `--train-only` trains, counted on the model built on the meta device."""
    from d2m_export.sources.models import load_config, meta_model

    if train_only not in TRAINED:
        raise UserError(f"--train-only must be all, moe or router, not {train_only!r}")
    model = meta_model(load_config(model_dir))
    return sum(p.numel() for name, p in model.named_parameters() if TRAINED[train_only](name))


def select_trainable(model, train_only: str, frozen: set = frozenset()) -> list[torch.nn.Parameter]:
    """The parameters `train_only` names, less `frozen`; only they require gradients."""
    if train_only not in TRAINED:
        raise UserError(f"--train-only must be all, moe or router, not {train_only!r}")
    keep = TRAINED[train_only]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name) and p not in frozen)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise UserError(f"--train-only {train_only}: the model has no MoE layers to train; use --train-only all")
    return params
