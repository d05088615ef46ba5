"""Training checkpoints: written atomically (temp dir + rename), the last M kept, the latest resumed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from d2m_export.errors import UserError


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "trainer.json").is_file()) if root.is_dir() else []


def save(out: Path, step: int, model, optimizer, scheduler, meta: dict, keep_last: int) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors refuses duplicates, and load_state_dict re-ties them.
    seen, unique = set(), {}
    for k, v in state.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v
    try:
        save_file(unique, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "trainer.json").write_text(json.dumps({**meta, "step": step}, indent=2))  # written last: marks complete
    except Exception as e:      # a full disk surfaces as OSError, or RuntimeError from torch's writer
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(out)
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]) or type(e).__name__
        raise UserError(f"cannot write the step-{step} checkpoint into {root} ({reason}); "
                        + (f"{previous[-1].name} is intact: free space and rerun with --resume" if previous
                           else "no earlier checkpoint")) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(out: Path, model, optimizer, scheduler, meta: dict) -> int:
    """Restore the newest complete checkpoint; returns its step. Refuses one from another run setup."""
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise UserError(f"--resume: no checkpoint in {out}/checkpoints")
    latest = dirs[-1]
    if (latest / ".metadata").is_file():
        raise UserError(f"--resume: {latest} is a sharded --fsdp checkpoint; resume it with --fsdp under a launcher")
    saved = json.loads((latest / "trainer.json").read_text())
    check_meta(latest, saved, meta)
    model.load_state_dict(load_file(latest / "model.safetensors"), strict=False)
    state = torch.load(latest / "optim.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return saved["step"]


def check_meta(latest: Path, saved: dict, meta: dict) -> None:
    """Refuse to resume a checkpoint made from another model or run setup."""
    for key in ("base_fingerprint", "seq_len", "global_batch", "corpora", "data", "seed", "train_only", "weights_dtype"):
        if saved.get(key) != meta.get(key):
            what = "a different model" if key == "base_fingerprint" else f"a different {key} ({saved.get(key)!r})"
            raise UserError(f"--resume: {latest} was trained from {what}; resume with the same settings "
                            f"or use a new --out")
