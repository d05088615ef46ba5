"""What local healing fits: per plan block, the residual stream that enters it in the dense model
and what the dense layers had produced at its end, on calibration windows.

A block (host, donors) of the dense model becomes one layer of the converted model (the host's,
renumbered past the dropped donors). Blocks are fitted independently on the dense inputs, so
each fit is small and their order does not matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from d2m_export.plan import Block, Plan


@dataclass
class BlockData:
    block: Block
    layer: int                  # index of the fused layer in the converted model
    x: torch.Tensor             # [windows, T, H] dense residual entering the host
    y: torch.Tensor             # [windows, T, H] dense residual leaving the block's last layer

    def split(self, held_out: int) -> tuple["BlockData", "BlockData"]:
        """(fit, held-out) by windows: the last `held_out` windows are kept for early stopping."""
        cut = len(self.x) - held_out
        return (BlockData(self.block, self.layer, self.x[:cut], self.y[:cut]),
                BlockData(self.block, self.layer, self.x[cut:], self.y[cut:]))


def converted_index(plan: Plan, dense_layer: int) -> int:
    kept = [i for i in range(plan.num_layers) if i not in set(plan.donors)]
    return kept.index(dense_layer)


@torch.inference_mode()
def collect_blocks(dense, plan: Plan, input_ids: torch.Tensor, batch_size: int = 4,
                   progress: bool = True) -> list[BlockData]:
    """Run the dense model once over `input_ids` [windows, T] and keep each block's input and output."""
    layers = dense.model.layers
    wanted = {b.host for b in plan.blocks} | {b.host + len(b.donors) + 1 for b in plan.blocks}
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    hooks = []
    for i in sorted(wanted):
        if i < len(layers):
            hooks.append(layers[i].register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: seen[i].append(_hidden(args, kwargs).float()), with_kwargs=True))
        else:   # the stream leaving the last layer
            hooks.append(layers[-1].register_forward_hook(
                lambda mod, args, out, i=i: seen[i].append((out[0] if isinstance(out, tuple) else out).float())))
    try:
        from tqdm import tqdm
        for start in tqdm(range(0, len(input_ids), batch_size), desc="healing: dense targets", unit="batch",
                          disable=not progress):
            dense.get_decoder()(input_ids=input_ids[start:start + batch_size].to(dense.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    full = {i: torch.cat(v) for i, v in seen.items()}
    return [BlockData(b, converted_index(plan, b.host), full[b.host], full[b.host + len(b.donors) + 1])
            for b in plan.blocks]


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]
