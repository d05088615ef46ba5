"""Will a stage fit in memory? An estimate from the config alone, checked before any work starts, so
that a model too large for this machine gets one clear line instead of an OOM kill halfway.

The estimates are what `bench/scale.py` measured per stage (bench/results/scale.md), as multiples of
the weights' bytes in the stage's working dtype, plus the activations a stage holds and the
interpreter with torch and transformers loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from d2m_export.errors import UserError

GB = 2**30
RUNTIME_BYTES = int(0.8 * GB)     # python + torch + transformers, before any weight
LIMIT_ENV = "D2M_MEMORY_LIMIT_GB"  # the memory d2m-export may use (default: what the system has available)


def available_bytes() -> int:
    """$D2M_MEMORY_LIMIT_GB if set; else the system's available memory, capped by a cgroup limit."""
    if os.environ.get(LIMIT_ENV):
        try:
            return int(float(os.environ[LIMIT_ENV]) * GB)
        except ValueError:
            raise UserError(f"${LIMIT_ENV} must be a number of GiB, not {os.environ[LIMIT_ENV]!r}") from None
    import psutil

    free = psutil.virtual_memory().available
    try:
        limit, used = (Path("/sys/fs/cgroup") / "memory.max").read_text().strip(), \
            int((Path("/sys/fs/cgroup") / "memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """The model's parameters × the bytes of `dtype` (float32, bfloat16, float16)."""
    from d2m_export.sources.models import load_config
    from d2m_export.sources.params import param_counts

    config = load_config(model_dir)
    try:
        params = param_counts(config).total
    except (TypeError, ValueError, ArithmeticError) as e:  # numbers transformers accepts but no model has
        raise UserError(f"{model_dir}/config.json does not describe a model ({e.__class__.__name__}: {e}); "
                        "re-save the model") from None
    return params * (4 if dtype == "float32" else 2)


def fp32_copy_fits(model_dir: Path) -> bool:
    """Whether the model upcast to fp32 whole, with the runtime, fits 1.5 times over in the available memory."""
    return 1.5 * (weight_bytes(model_dir, "float32") + RUNTIME_BYTES) <= available_bytes()


def check_memory(model_dir: Path, stage: str, need: int, how: str = "", other_ways: str = "") -> None:
    """Refuse `stage` when its estimated peak `need` (bytes, weights and activations) plus the runtime
    exceeds what is available. `other_ways`: what else would make it fit, said after the usual remedies."""
    need += RUNTIME_BYTES
    have = available_bytes()
    if need > have:
        raise UserError(f"{stage} of {model_dir} needs about {need / GB:.1f} GiB of memory ({how or 'estimated from its config'}) "
                        f"and {have / GB:.1f} GiB is available; free memory, use a machine with more"
                        f"{', ' + other_ways if other_ways else ''}, or set ${LIMIT_ENV} if the estimate is wrong for you")


def check_model_stage(model_dir: Path, stage: str, dtype: str, extra: int = 0, how: str = "") -> None:
    """`stage` holds the model once in `dtype`, plus `extra` bytes (activations, outputs)."""
    check_memory(model_dir, stage, weight_bytes(model_dir, dtype) + extra, how or f"the model in {dtype}")


def logits_bytes(model_dir: Path, batch: int, tokens: int, dtype: str) -> int:
    """One batch's logits: at 150k-word vocabularies these rival a small model's weights."""
    from d2m_export.sources.models import load_config

    return batch * tokens * load_config(model_dir).vocab_size * (4 if dtype == "float32" else 2)
