"""Model families, one module each: what we read, what a dense model of the family is converted
into, and how that MoE family stores a fused layer. Adding a family touches one module here (and,
per export target, that target's own table of the runtime architectures it maps to)."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

ARCHITECTURES: dict[str, "Architecture"] = {}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    is_moe: bool                 # a Mixture-of-Experts family (our conversions' outputs, or read for moe2dense)
    qkv_bias: bool = False       # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False        # RMSNorm on q and k before RoPE: per head (Qwen3), or
    qk_norm_full: bool = False   # over the whole projection, every head at once (OLMo 2)
    fuses_into: str | None = None   # dense families: the MoE family LF-UC and upcycling write
    no_fusion_reason: str | None = None   # dense families with no exact MoE form: why (LF-UC/upcycle refuse)
    attn_norm: str | None = "input_layernorm"    # the norm whose output is the attention's input; None: no norm
    mlp_norm: str | None = "post_attention_layernorm"   # the norm whose output is the MLP's input; None: no norm
    attn_out_norm: str | None = None   # a norm on the attention's output before the residual add (Gemma)
    mlp_out_norm: str | None = None    # a norm on the MLP's output before the residual add (Gemma)
    norm_offset: float = 0.0     # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    norms_per_layer: int = 2     # RMSNorms of hidden width per layer (Gemma 3: 4, around attention and MLP)
    params_from_modules: bool = False   # count parameters off the module tree (layouts params.py's formula lacks)
    reads_as: str | None = None  # a family every stage reads through an exact view as this one (`ReadAs`)

    # --- MoE families we write --------------------------------------------------------------
    def moe_config(self, dense_config, *, num_layers: int, mlp_only_layers: list[int], num_experts: int,
                   top_k: int, shared_size: int):
        """The config of a converted model: the dense model's attention, norms and vocabulary; MoE FFNs
        in the layers not listed in `mlp_only_layers`; `shared_size`: the always-on host MLP's width."""
        raise NotImplementedError(f"{self.model_type} is not a family we convert into")

    def moe_mlp_state(self, experts_gate_up: torch.Tensor, experts_down: torch.Tensor, router: torch.Tensor,
                      shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """One MoE FFN's weights under `mlp.`: experts [E, 2I, H] (gate rows, then up rows) and [E, H, I],
        the router [E, H], and the always-on MLP (gate, up, down), added at weight 1, or None."""
        raise NotImplementedError(f"{self.model_type} is not a family we convert into")


class MoeInput(Architecture):
    """An MoE family moe2dense reads. The defaults are the common layout: `layer.mlp` holds a router
    `gate` that returns (logits, top-k weights, top-k index) and `experts` with stacked `gate_up_proj`
    [E, 2I, H] and `down_proj` [E, H, I]; dense layers hold gate/up/down_proj; no always-on expert."""
    ffn_modules: tuple[str, ...] = ("mlp",)   # per-layer modules replaced by the dense MLP

    def moe_block(self, layer):
        mlp = getattr(layer, "mlp", None)
        return mlp if hasattr(mlp, "experts") else None

    def router(self, block):
        return block.gate

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each expert's router probability before top-k (the `pp` score)."""
        return torch.softmax(logits, dim=-1)

    def dense_mlp(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight

    def always_on(self, layer, block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The MoE layer's always-on (shared) expert as (gate, up, down), or None."""
        return None

    def always_on_gate(self, block, x: torch.Tensor) -> torch.Tensor | None:
        """Per token, the weight the always-on expert is added with; None: weight 1."""
        return None

    def dense_model(self, moe_config, width: int, state: dict):
        """(config, state dict) of the dense model holding the MoE model's attention exactly, its MLPs
        of `width` under `model.layers.i.mlp.{gate,up,down}_proj.weight` in `state`."""
        raise NotImplementedError


class ReadAs(Architecture):
    """A dense family every stage and target reads as another (`reads_as`) through an exact view: the
    config rewritten as the other family's, the weights as stored or with what the other family lacks
    folded into them (`view_tensor`). `sources.views` writes the view once; nothing after it sees this
    family. `refusal` names what no view can hold."""

    def view_config(self, config) -> dict:
        """The view's config as `AutoConfig.for_model` takes it, from this family's config object."""
        raise NotImplementedError

    def folds_weights(self, config) -> bool:
        """Whether the view's tensors differ from the stored ones (else the view links to them)."""
        return False

    def view_tensor(self, config, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def view_tensors(self, config, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The view's tensors made from stored tensor `name`: one, folded (`view_tensor`), or several where
        the family stores fused what the other family keeps apart (Phi-3's qkv_proj)."""
        return {name: self.view_tensor(config, name, tensor)}

    def refusal(self, config) -> str | None:
        """Why this model cannot be read as `reads_as` exactly, or None."""
        return None


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.model_type] = arch
    return arch


def dense_families() -> list[str]:
    return [k for k, a in ARCHITECTURES.items() if not a.is_moe]


def _common(d) -> dict:
    """Config fields every converted model keeps from its dense source."""
    return dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
                head_dim=getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads,
                hidden_act=d.hidden_act, max_position_embeddings=d.max_position_embeddings,
                rms_norm_eps=d.rms_norm_eps, rope_parameters=dict(d.rope_parameters),
                tie_word_embeddings=d.tie_word_embeddings, bos_token_id=d.bos_token_id,
                eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id, use_sliding_window=False)


def _dense_common(c, width: int) -> dict:
    """Config fields a dense model made from MoE config `c` keeps (its MLPs `width` wide)."""
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=width,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
                max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def layer_types(config) -> list[str | None]:
    """Per layer, "sliding_attention" / "full_attention" where the config says, else None."""
    return list(getattr(config, "layer_types", None) or [None] * config.num_hidden_layers)


NO_ROPE = "no_rope"     # the RoPE key of a layer that applies none (SmolLM3's NoPE layers): cos 1, sin 0


def rope_keys(config) -> list[str | None]:
    """Per layer, which RoPE table it reads: its layer type where RoPE is given per type (Gemma 3's local
    and global bases; `rotary_emb(x, pos, key)`), `NO_ROPE` where the layer applies none (SmolLM3's
    `no_rope_layers`, 0 there), else None (one table, `rotary_emb(x, pos)`)."""
    rope = getattr(config, "rope_parameters", None) or {}
    keys = [t if t in rope else None for t in layer_types(config)]
    applies = getattr(config, "no_rope_layers", None)
    return [k if a else NO_ROPE for k, a in zip(keys, applies)] if applies else keys


def rotary_cos_sin(rotary, x: torch.Tensor, positions: torch.Tensor, key: str | None):
    """(cos, sin) of transformers' rotary module `rotary` at `positions` for a layer whose RoPE key is `key`."""
    if key == NO_ROPE:
        cos, sin = rotary(x, positions)
        return torch.ones_like(cos), torch.zeros_like(sin)
    return rotary(x, positions, key) if key else rotary(x, positions)


# RoPE types a table of cos/sin per position, computed once by transformers' own rotary module (the onnx,
# executorch and coreml targets), reproduces exactly. `dynamic` (NTK) picks its frequencies from the current
# length; `longrope` too, but only between two sets: its short factors while a forward pass stays within
# `original_max_position_embeddings`, so a table of that many positions holds it (`table_positions`).
TABLE_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


def rope_types(config) -> list[str]:
    """The RoPE types a config names (a config object or its config.json dict), one per layer type where
    RoPE is given per type (Gemma 3): from `rope_parameters`, or the older `rope_scaling` (`rope_type` or
    `type`), "default" where none is named."""
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    params = get("rope_parameters") or get("rope_scaling") or {}
    groups = [v for v in params.values() if isinstance(v, dict)] or [params]
    return sorted({g.get("rope_type") or g.get("type") or "default" for g in groups})


def table_positions(config) -> int | None:
    """How many positions a precomputed RoPE table holds exactly (a config object or its config.json dict):
    the model's `max_position_embeddings`, or with `longrope` its `original_max_position_embeddings`: a
    forward pass reaching past those switches every position to the long factors, which no table fixed per
    position follows."""
    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    positions = get(config, "max_position_embeddings")
    if "longrope" in rope_types(config):
        params = get(config, "rope_parameters") or get(config, "rope_scaling") or {}
        original = get(params, "original_max_position_embeddings") or get(config, "original_max_position_embeddings")
        positions = min(int(original), int(positions or original)) if original else positions
    return int(positions) if positions else None


def check_table_rope(config, target: str, max_seq_len: int | None = None) -> None:
    """Refuse, in one line naming the target and the RoPE type, RoPE that a precomputed table cannot hold,
    and a `--max-seq-len` past the positions it holds exactly (longrope's original context)."""
    from d2m_export.errors import UserError

    for kind in rope_types(config):
        if kind not in TABLE_ROPE:
            raise UserError(f"RoPE type {kind!r} is not supported by the {target} target: its frequencies depend on "
                            f"the sequence length (supported: {', '.join(TABLE_ROPE)})")
    limit = table_positions(config)
    if "longrope" in rope_types(config) and max_seq_len is not None and limit and max_seq_len > limit:
        raise UserError(f"--max-seq-len {max_seq_len} is beyond what the {target} target holds exactly with RoPE type "
                        f"'longrope': {limit} positions (original_max_position_embeddings; past them transformers "
                        f"switches every position to the long factors, which a table per position cannot follow)")


def norms_as_scales(config, state: dict) -> dict:
    """`state` with every RMSNorm weight as the scale it applies: Gemma stores w and scales by (1 + w)."""
    offset = ARCHITECTURES[config.model_type].norm_offset if config.model_type in ARCHITECTURES else 0.0
    if not offset:
        return state
    return {k: v + offset if k.endswith("norm.weight") else v for k, v in state.items()}


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
