"""Layer pruning baseline (ShortGPT / Gromov et al.): drop the plan's donor layers outright."""
from __future__ import annotations

import copy

import torch

from d2m_export.sources.lazy_weights import LazyState
from d2m_export.methods.base import Method, check_convertible, register, shared_state
from d2m_export.plan import Plan


@register
class Prune(Method):
    name = "prune"
    description = "drop the donor layers outright (attention and MLP)"
    writes_moe = False

    def output_config(self, dense_config, plan: Plan):
        check_convertible(dense_config)
        config = copy.deepcopy(dense_config)
        kept = [i for i in range(plan.num_layers) if i not in set(plan.donors)]
        config.num_hidden_layers = len(kept)
        for per_layer in ("layer_types", "no_rope_layers"):      # Gemma 3's, SmolLM3's
            if getattr(config, per_layer, None):
                setattr(config, per_layer, [getattr(config, per_layer)[i] for i in kept])
        return config

    def convert_state(self, dense_config, src, plan: Plan, acts=None, dtype=torch.float32):
        kept = [i for i in range(plan.num_layers) if i not in set(plan.donors)]
        state = LazyState(dtype)
        state.copy(src, shared_state(src, kept))
        return self.output_config(dense_config, plan), state
