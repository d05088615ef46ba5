"""Families read as another through an exact view (`architectures.ReadAs`: Mistral, Granite and Phi-3 as Llama).

The view is a model folder in the cache, written once per checkpoint: the other family's config.json, the
weights linked to the stored files or, where the family folds something into them, rewritten with the fold,
and every other file (tokenizer, generation config) linked. `resolve_model` hands it to every stage and
target in place of the folder given, as it hands a .gguf file's dequantized copy.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from d2m_export.architectures import ReadAs
from d2m_export.errors import UserError
from d2m_export.paths import cache_dir

INDEX = "model.safetensors.index.json"
ORIGIN = "d2m_view_origin.json"     # in the view: the folder and family it was made from


def weight_files(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors files: those its index names (a Mistral repository's
    consolidated.safetensors, in Mistral's own layout, is left out), else every one."""
    index = model_dir / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(f.name for f in model_dir.glob("*.safetensors"))


def source_name(model_dir: Path) -> str:
    """The name of the folder a model came from: a view's source folder, else the folder itself."""
    origin = Path(model_dir) / ORIGIN
    return Path(json.loads(origin.read_text())["source"]).name if origin.is_file() else Path(model_dir).name


def view_path(model_dir: Path, arch: ReadAs) -> Path:
    """Where the view of `model_dir` is cached: keyed by the folder, its config and its weight files'
    sizes and times, so that a changed checkpoint gets a new view."""
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode() + (model_dir / "config.json").read_bytes())
    for name in weight_files(model_dir):
        st = (model_dir / name).stat()
        key.update(f"|{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_dir() / "models" / "views" / f"{model_dir.name}-{arch.model_type}-{key.hexdigest()[:12]}"


def read_as(model_dir: Path, arch: ReadAs, config) -> Path:
    """The view of `model_dir` (a model of `arch`, `config` its transformers config) as `arch.reads_as`,
    made on first use; a model the view cannot hold exactly is refused, naming why."""
    why = arch.refusal(config)
    if why:
        raise UserError(f"{model_dir}: {why}")
    model_dir = Path(model_dir).resolve()
    files = weight_files(model_dir)
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights; {arch.model_type} models are read from safetensors "
                        f"checkpoints")
    out = view_path(model_dir, arch)
    if (out / "config.json").is_file():
        return out
    _write_view(model_dir, arch, config, files, out)
    return out


def _write_view(model_dir: Path, arch: ReadAs, config, files: list[str], out: Path) -> None:
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from d2m_export.outputs import atomic_dir

    logging.getLogger(__name__).info("reading %s (%s) as %s (once)", model_dir, arch.model_type, arch.reads_as)
    fold = arch.folds_weights(config)
    weight_map = {}         # a folded view's tensor names (split tensors are renamed) -> file, for its index
    with atomic_dir(out) as tmp:
        for name in files:
            if not fold:
                (tmp / name).symlink_to(model_dir / name)
                continue
            with safe_open(model_dir / name, framework="pt") as f:
                tensors = {}
                for k in f.keys():
                    tensors.update(arch.view_tensors(config, k, f.get_tensor(k)))
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if fold and (model_dir / INDEX).is_file():
            (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "config.json" and f.suffix != ".safetensors" and not (tmp / f.name).exists():
                (tmp / f.name).symlink_to(f)
        view = AutoConfig.for_model(**arch.view_config(config))
        view.architectures = [AutoModelForCausalLM._model_mapping[type(view)].__name__]
        view.save_pretrained(tmp)
        (tmp / ORIGIN).write_text(json.dumps({"source": str(model_dir), "model_type": arch.model_type,
                                              "read_as": arch.reads_as}) + "\n")
