"""`train --fsdp`: PyTorch's FSDP2 (`fully_shard`) under torchrun / accelerate launch.

Each decoder layer is its own shard group, then the root (embeddings, final norm, LM head), so
a rank holds 1/N of the weights, gradients and Adam state, and gathers one layer at a time.
With `--dtype bf16` parameters are gathered and computed in bf16 and gradients reduced in fp32
(`MixedPrecisionPolicy`); the sharded master weights and optimizer state stay fp32.

Zero-element parameters (the width-0 shared expert of a Qwen2-MoE that LF-UC's routed host and
upcycling write) are left out of sharding and training: FSDP2's reduce-scatter refuses empty
gradients, and there is nothing in them to shard or train. They stay whole on every rank, so the
gathered model and its checkpoints keep them, and `AutoModelForCausalLM` loads what is saved.
(Without --fsdp they stay in the optimizer, as before: an empty gradient costs nothing there, and
the optimizer state of checkpoints written earlier lists them.)

Checkpoints are torch.distributed.checkpoint (DCP) directories: every rank writes its shards, and
loading reshards them to whatever number of processes resumes (2 → 1 is tested).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from d2m_export.errors import UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def check_launcher() -> None:
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise UserError("--fsdp shards the model over processes started by a launcher: run it as "
                        "`torchrun --nproc-per-node N -m d2m_export.cli train --fsdp ...` or "
                        "`accelerate launch --num_processes N -m d2m_export.cli train --fsdp ...` "
                        f"({', '.join(missing)} not set)")


def empty_params(model) -> set[torch.nn.Parameter]:
    return {p for p in model.parameters() if p.numel() == 0}


def shard(model, dtype: str, device: str = "cpu"):
    """Shard `model` in place over every process (a 1-D mesh of `device`'s type); returns it.
    Zero-element parameters are not sharded (`empty_params`); under bf16 they take the compute dtype,
    since the inputs of their modules arrive in bf16 and a matmul refuses mixed dtypes, even empty."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" \
        else MixedPrecisionPolicy()
    empty = empty_params(model)
    for p in empty:
        p.data = p.data.to(device, torch.bfloat16 if dtype == "bf16" else p.dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=empty)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=empty)
    return model


def clip_grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file()) if root.is_dir() else []


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / ".metadata").is_file()


def save(out: Path, step: int, model, optimizer, scheduler, meta: dict, keep_last: int) -> None:
    """A collective: every rank writes its shards into one temporary directory; rank 0 then adds
    trainer.json (the completeness mark) and renames it into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = out / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(
            {**meta, "step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size()},
            indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _dirs(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_latest(out: Path, model, optimizer, scheduler, meta: dict, compare) -> int:
    """Restore the newest sharded checkpoint, resharded to this run's processes; its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dirs = _dirs(out)
    if not dirs:
        raise UserError(f"--resume: no checkpoint in {out}/checkpoints")
    latest = dirs[-1]
    if not is_sharded(latest):
        raise UserError(f"--resume --fsdp: {latest} was written without --fsdp; resume it without --fsdp")
    saved = json.loads((latest / "trainer.json").read_text())
    compare(latest, saved, meta)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(latest))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["step"]


def gathered(model):
    """Rank 0: an unsharded copy of `model` (fp32, on the CPU) to evaluate and save; other ranks: None.
    A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()
