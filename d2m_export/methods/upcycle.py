"""Sparse upcycling baseline (Komatsuzaki et al.): every MLP copied into N experts, new router.

With a zero router every selected copy gets weight 1/k and the copies are equal, so the
upcycled model reproduces the dense one exactly; active parameters do not fall.
"""
from __future__ import annotations

import torch

from d2m_export.sources.lazy_weights import LazyState
from d2m_export.methods.base import (Method, check_convertible, experts_names, moe_config, moe_mlp_state, register,
                                     shared_state)
from d2m_export.plan import Plan


@register
class Upcycle(Method):
    name = "upcycle"
    description = "copy each MLP into N experts behind a new zero router"
    allow_empty_donors = True

    def _layers(self, plan: Plan) -> list[int]:
        return [b.host for b in plan.blocks] if plan.blocks else list(range(plan.num_layers))

    def output_config(self, dense_config, plan: Plan):
        check_convertible(dense_config)
        upcycled = set(self._layers(plan))
        n = plan.options.num_experts or 4
        return moe_config(dense_config, num_layers=plan.num_layers,
                          mlp_only_layers=[i for i in range(plan.num_layers) if i not in upcycled],
                          num_experts=n, top_k=plan.options.top_k, shared_size=0)

    def convert_state(self, dense_config, src, plan: Plan, acts=None, dtype=torch.float32):
        config = self.output_config(dense_config, plan)
        layers = self._layers(plan)
        state = LazyState(dtype)
        state.copy(src, shared_state(src, list(range(plan.num_layers)), skip_mlp_of=set(layers)))
        n, h = config.num_experts, config.hidden_size

        def experts(i: int) -> dict:
            p = f"model.layers.{i}.mlp."
            gate_up = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]])
            return moe_mlp_state(dense_config, p, gate_up.expand(n, -1, -1),
                                 src[p + "down_proj.weight"].expand(n, -1, -1), torch.zeros(n, h))

        for i in layers:
            state.add(list(experts_names(dense_config, f"model.layers.{i}.mlp.")), lambda i=i: experts(i))
        return config, state
