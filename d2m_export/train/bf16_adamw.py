"""AdamW for bf16 parameters: fp32 moments, the update computed in fp32 and rounded to bf16
stochastically, so that updates smaller than half a bf16 step (8 bits of mantissa) are not lost on
average. 12 bytes per trained parameter (bf16 weight and gradient, two fp32 moments) instead of
fp32 training's 16, and no fp32 master copy.

torchao has the rounding (`_AdamW(bf16_stochastic_round=True)`), but only in a private class that
keeps the moments in bf16 and compiles a kernel per parameter shape; this is the same update as
`torch.optim.AdamW`, written out.
"""
from __future__ import annotations

import math

import torch

CHUNK = 1 << 22     # elements updated at a time


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16, rounding away from zero with probability equal to the distance to the lower
    magnitude (unbiased): random low 16 bits are added to the fp32 pattern, then cut off."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)   # exact: low bits are zero


class BF16AdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW`'s update (decoupled weight decay, bias-corrected moments) on bf16 parameters.
    The rounding noise of step t comes from `seed` and t alone, so a resumed run and every data-parallel
    rank round the same way."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        generators: dict[tuple, torch.Generator] = {}
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = int(state["step"])
                key = (t, p.device)
                if key not in generators:
                    generators[key] = torch.Generator(device=p.device).manual_seed(self.seed * 1_000_003 + t)
                # in slices: the fp32 temporaries of a whole 128k-word embedding would be several GB
                flat = [x.view(-1) for x in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), CHUNK):
                    param, grad, exp_avg, exp_avg_sq = (x[start:start + CHUNK] for x in flat)
                    grad = grad.float()
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                    updated = param.float().mul_(1 - lr * wd).addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                    param.copy_(stochastic_round_bf16(updated, generators[key]) if p.dtype == torch.bfloat16
                                else updated)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts floating-point state to its parameter's dtype; the moments stay fp32
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step":
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
