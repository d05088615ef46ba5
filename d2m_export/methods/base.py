"""The interface every conversion method implements, and the registry that names them."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from d2m_export.errors import UserError
from d2m_export.sources.lazy_weights import LazyState
from d2m_export.architectures import ARCHITECTURES, Architecture, dense_families
from d2m_export.plan import Plan

METHODS: dict[str, "Method"] = {}


def register(cls):
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> "Method":
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


class Method:
    name: str
    description: str
    allow_empty_donors = False
    calibrates_router = False     # build() fits routers on calibration activations when the plan asks
    writes_moe = True             # the output is in the dense family's MoE family (prune: the dense family)

    def output_config(self, dense_config, plan: Plan):
        """The config of the converted model (no weights): what the planner costs."""
        raise NotImplementedError

    def convert_state(self, dense_config, src: Mapping, plan: Plan, acts=None,
                      dtype: torch.dtype = torch.float32) -> tuple[object, LazyState]:
        """The converted model's config and its weights (to be written in `dtype`), made lazily from the
        dense weights `src` (by state-dict name); `acts` are calibration activations when the method uses them."""
        raise NotImplementedError

    def build(self, model, plan: Plan, acts=None):
        """The converted model, in memory."""
        config, state = self.convert_state(model.config, model.state_dict(), plan, acts)
        return instantiate(config, state.materialize())

    def scored_block(self, host: int, n_donors: int) -> tuple[int, int]:
        """(start, length) of the analysis block whose redundancy a candidate (host, n donors) relies on:
        the stretch of donors, since the host layer keeps its attention and MLP whole."""
        return host + 1, n_donors


def check_convertible(config) -> Architecture:
    """The dense family of `config`, if we convert it."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None or arch.is_moe:
        raise UserError(f"this method converts dense models ({', '.join(dense_families())}); got {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("models with an o_proj or MLP bias are not supported yet (attention_bias/mlp_bias is set)")
    if getattr(config, "use_sliding_window", False):
        raise UserError("models with sliding-window attention are not supported yet (use_sliding_window is set)")
    return arch


def moe_family(dense_config) -> Architecture:
    """The MoE family a dense model of this family is converted into."""
    arch = check_convertible(dense_config)
    if arch.fuses_into is None:
        raise UserError(f"{arch.model_type} models cannot be converted to MoE: {arch.no_fusion_reason}")
    return ARCHITECTURES[arch.fuses_into]


def moe_config(dense_config, *, num_layers: int, mlp_only_layers: list[int], num_experts: int, top_k: int,
               shared_size: int):
    """The converted model's config, in the MoE family of the dense model's family."""
    return moe_family(dense_config).moe_config(dense_config, num_layers=num_layers, mlp_only_layers=mlp_only_layers,
                                               num_experts=num_experts, top_k=top_k, shared_size=shared_size)


def moe_mlp_state(dense_config, prefix: str, experts_gate_up, experts_down, router, shared=None) -> dict:
    """One MoE FFN's weights, named under `prefix` (`model.layers.N.mlp.`) as the MoE family stores them."""
    parts = moe_family(dense_config).moe_mlp_state(experts_gate_up, experts_down, router, shared)
    return {prefix + k: v for k, v in parts.items()}


def experts_names(dense_config, prefix: str, shared: bool = False) -> list[str]:
    """The names `moe_mlp_state` writes under `prefix`, known before any weight is made."""
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    parts = moe_family(dense_config).moe_mlp_state(meta(1, 2, 1), meta(1, 1, 1), meta(1, 1),
                                                   (meta(1, 1), meta(1, 1), meta(1, 1)) if shared else None)
    return [prefix + k for k in parts]


def shared_state(src: Mapping, kept: list[int], skip_mlp_of: set[int] = frozenset()) -> dict[str, str]:
    """Embeddings, final norm, LM head, and each kept layer's attention/norms (and MLP unless skipped),
    renumbered so that kept[i] becomes layer i: {output name: source name}."""
    out = {k: k for k in src if not k.startswith("model.layers.")}
    for new, old in enumerate(kept):
        prefix = f"model.layers.{old}."
        for k in src:
            if k.startswith(prefix):
                rest = k[len(prefix):]
                if rest.startswith("mlp.") and old in skip_mlp_of:
                    continue
                out[f"model.layers.{new}.{rest}"] = k
    return out


def instantiate(config, state: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    result = model.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"conversion mapped weights wrongly: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model
