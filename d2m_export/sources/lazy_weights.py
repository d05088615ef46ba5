"""Conversion tensor by tensor: source weights read lazily from safetensors, the converted model's weights
made one group at a time and written in shards, so that no stage holds two copies of a model.

A conversion method describes its output as a `LazyState`: groups of output tensors, each made by a
function of source tensors when the group is written. `write_checkpoint` writes it as a Hugging Face
checkpoint (sharded safetensors and their index, as `save_pretrained` writes them); `materialize`
gives the whole state at once for an in-memory model (tests, healing).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

SHARD_BYTES = 512 << 20    # a shard is held whole until it is written: small shards keep the peak low


class _ByName(Mapping):
    """Tensors by name, made when read; `_names` holds whatever each name needs to make its tensor."""
    _names: dict

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class SourceWeights(_ByName):
    """A checkpoint's tensors by name, each read from its safetensors file when asked for (the file is
    mapped only while the tensor is read, so untouched weights never count against memory)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._names: dict[str, Path] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                self._names.update({name: path for name in f.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._names[name], framework="pt") as f:
            return f.get_tensor(name)


def source_weights(model, model_dir: Path) -> Mapping:
    """The model's weights by state-dict name: lazily from its safetensors files when they hold exactly
    those names (a tied LM head aside), else the loaded model's own tensors."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    lazy = SourceWeights(model_dir)
    return lazy if set(lazy) - tied == set(model.state_dict()) - tied else model.state_dict()


class Float32Arrays(_ByName):
    """A loaded model's weights as fp32 numpy arrays, each converted when it is read (norm weights as the
    scale they apply, `norms_as_scales`): the model stays in its stored dtype, one tensor at a time is
    fp32. A tied LM head is left out."""

    def __init__(self, model):
        from d2m_export.architectures import ARCHITECTURES

        self._names = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            self._names.pop("lm_head.weight", None)
        self.offset = ARCHITECTURES[model.config.model_type].norm_offset

    def __getitem__(self, name: str):
        w = self._names[name].detach().float().numpy()
        return w + self.offset if self.offset and name.endswith("norm.weight") else w

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._names[name].shape)

    def part(self, name: str, index):
        """`self[name][index]`, converting only that part to fp32 (a fused expert tensor's gate half)."""
        return self._names[name].detach()[index].float().numpy()


class Float32Shapes(Float32Arrays):
    """`Float32Arrays`' names and shapes for a writer's header pass, without making their values: a large
    tensor reads as a zero-stride view of one fp32 zero (reshapes and transposes stay views), a small one
    as itself, since conversion code may look at small tensors' values (a gate, a scale)."""

    def __init__(self, arrays: Float32Arrays, large: int = 1 << 20):
        self._names, self._arrays, self._large = arrays._names, arrays, large

    def __getitem__(self, name: str):
        import numpy as np

        if self._names[name].numel() > self._large:
            return np.broadcast_to(np.float32(0), self.shape(name))
        return self._arrays[name]

    def part(self, name: str, index):
        import numpy as np

        return np.broadcast_to(np.float32(0), tuple(self._names[name][index].shape))


class LazyState:
    """The converted model's weights, as groups of names and the function that makes them. `dtype` is
    what they will be written in: a group may make its tensors in it directly (fp32 arithmetic, then
    one cast per tensor) so that a large group is never held in fp32 whole."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.groups: list[tuple[list[str], Callable[[], dict[str, torch.Tensor]]]] = []

    def add(self, names: list[str], make: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.groups.append((list(names), make))

    def copy(self, src: Mapping, renames: dict[str, str]) -> None:
        """Output tensors that are source tensors under a new name (`new: old`)."""
        for new, old in renames.items():
            self.add([new], lambda new=new, old=old: {new: src[old]})

    def made_groups(self) -> Iterator[dict[str, torch.Tensor]]:
        for names, make in self.groups:
            tensors = make()
            if sorted(tensors) != sorted(names):
                raise RuntimeError(f"conversion made {sorted(tensors)[:4]}, announced {sorted(names)[:4]}")
            yield {n: tensors[n] for n in names}

    def materialize(self) -> dict[str, torch.Tensor]:
        return {n: t for group in self.made_groups() for n, t in group.items()}


def write_checkpoint(config, state: LazyState, out: Path, dtype: torch.dtype, shard_bytes: int | None = None,
                     progress: bool = True) -> None:
    """Write `config` and `state` into the directory `out` as `save_pretrained` would: the same tensor
    names, floating-point tensors in `dtype`, shards of at most `shard_bytes` (one tensor may exceed it)
    and an index when there is more than one. One group and one shard are in memory at a time."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig

    tied = getattr(config, "tie_word_embeddings", False)
    on_disk = _checkpoint_names(config)
    shards = _Shards(out, shard_bytes or SHARD_BYTES)
    for group in tqdm(state.made_groups(), total=len(state.groups), desc="writing", unit="group", disable=not progress):
        for name, tensor in on_disk(group).items():
            if not (tied and name == "lm_head.weight"):
                shards.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards.close()
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    if generation != GenerationConfig():
        generation.save_pretrained(out)


class _Shards:
    """safetensors shards named and indexed as `save_pretrained` names them."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = Path(out), shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.storages: set[int] = set()
        self.files: list[list[str]] = []
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.shard_bytes:
            self._flush()
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.nbytes() > nbytes or storage.data_ptr() in self.storages:   # a view (of stacked or
            tensor = tensor.clone()                                             # repeated experts): a copy
        self.storages.add(tensor.untyped_storage().data_ptr())
        self.shard[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self.files.append(sorted(self.shard))
        save_file(self.shard, self.out / f".shard-{len(self.files)}.safetensors", metadata={"format": "pt"})
        self.shard, self.storages, self.size = {}, set(), 0

    def close(self) -> None:
        if self.shard:
            self._flush()
        weight_map = {}
        for i, names in enumerate(self.files, start=1):
            final = "model.safetensors" if len(self.files) == 1 else f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            (self.out / f".shard-{i}.safetensors").rename(self.out / final)
            (self.out / final).chmod(0o644)     # as save_pretrained leaves them (safetensors writes 0600)
            weight_map.update({n: final for n in names})
        if len(self.files) > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def _checkpoint_names(config) -> Callable[[dict], dict]:
    """Tensors by state-dict name -> as `save_pretrained` stores them: transformers reverts its load-time
    conversions on save (Qwen2-MoE's stacked experts become one tensor per expert), so we do too."""
    from transformers.core_model_loading import revert_weight_conversion

    from d2m_export.sources.models import meta_model

    meta = meta_model(config)
    return lambda group: revert_weight_conversion(meta, group)


def release_memory() -> None:
    """Hand freed heap back to the system (glibc keeps it otherwise, and peak RSS is what we promise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
