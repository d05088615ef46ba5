"""Run the dense model on calibration text and record, per layer, what LF-UC scores need.

For layer l we keep the residual stream entering it (`h[l]`, with `h[L]` the stream leaving
the last layer) and the stream entering the norm before its MLP (`r[l]`; Llama's post-attention
norm, Gemma's pre-feed-forward norm), from which the MLP input `u_l = γ_l ⊙ rms_normalise(r[l])`
follows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from d2m_export.sources.corpora import load_text, token_windows

CALIBRATION_CORPUS = "calibration"


@dataclass
class Activations:
    h: list[torch.Tensor]        # L+1 tensors [tokens, hidden], in the model's dtype
    r: list[torch.Tensor]        # L tensors [tokens, hidden]: input of each MLP-input norm, in the model's dtype
    gamma: list[torch.Tensor]    # L effective MLP-input norm scales
    eps: float
    tokens: int
    scores: object = None        # a BlockScorer fed batch by batch, when `h` was not kept
    _x_hat: dict = field(default_factory=dict, repr=False)

    def normalized(self, layer: int) -> torch.Tensor:
        """rms_normalise(r[layer]), before the norm's weight γ."""
        if layer not in self._x_hat:
            r = self.r[layer].float()
            self._x_hat[layer] = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + self.eps)
        return self._x_hat[layer]

    def mlp_input(self, layer: int, gamma_of: int | None = None) -> torch.Tensor:
        """u for `layer`'s residual, scaled by the norm weight of `gamma_of` (default: its own)."""
        return self.normalized(layer) * self.gamma[layer if gamma_of is None else gamma_of]


class BlockScorer:
    """What `analysis.score_blocks` averages over tokens, summed batch by batch, so that calibration need
    not keep every layer's residual stream (at 3B shapes, more memory than anything else it holds). It
    lives here, below the analysis, because `collect` feeds it as it runs."""

    def __init__(self):
        self.angular: dict[tuple[int, int], float] = {}
        self.cos: dict[tuple[int, int], float] = {}
        self.tokens = 0

    def update(self, h: list[torch.Tensor], x_hat: list[torch.Tensor], gamma: list[torch.Tensor]) -> None:
        """One batch: `h` the L+1 residual streams, `x_hat` the L normalised MLP inputs, each [T, H]."""
        num_layers = len(x_hat)
        # pair by pair, never [L, T, H] at once
        unit = [torch.nn.functional.normalize(x.float(), dim=-1) for x in h]
        for start in range(num_layers):
            for end in range(start + 1, num_layers + 1):
                cos = (unit[start] * unit[end]).sum(-1).double().clamp(-1, 1)            # [T]
                key = (start, end - start)
                self.angular[key] = self.angular.get(key, 0.0) + (torch.arccos(cos) / math.pi).sum().item()
        for donor in range(1, num_layers):
            w = gamma[donor].pow(2)
            own = (x_hat[donor].pow(2) @ w).sqrt()
            for host in range(donor):
                num = (x_hat[host] * x_hat[donor]) @ w                                     # [T]
                den = (x_hat[host].pow(2) @ w).sqrt() * own
                self.cos[host, donor] = self.cos.get((host, donor), 0.0) + \
                    (num / den.clamp_min(1e-12)).double().sum().item()
        self.tokens += len(x_hat[0])

    def blocks(self) -> list[dict]:
        """Every block (start, length): the residual's angular distance across it (Gromov et al.;
        ShortGPT's BI for length 1), and how well the host's MLP input stands in for each donor's
        own, min over donors, each donor's γ applied: mean_t cos(γ_d ⊙ x̂_host, γ_d ⊙ x̂_d)."""
        num_layers = max(start for start, _ in self.angular) + 1
        return [{"start": start, "length": n, "angular_distance": self.angular[start, n] / self.tokens,
                 "mlp_input_cos": min((self.cos[start, d] / self.tokens for d in range(start + 1, start + n)),
                                      default=1.0)}
                for start in range(num_layers) for n in range(1, num_layers - start + 1)]


def calibration_ids(tokenizer, tokens: int, window: int = 256) -> torch.Tensor:
    return token_windows(tokenizer, load_text(CALIBRATION_CORPUS), window, tokens)


@torch.inference_mode()
def collect(model, input_ids: torch.Tensor, batch_size: int | None = None, progress: bool = True,
            keep_streams: bool = True) -> Activations:
    """Run `model` on `input_ids`, `batch_size` windows at a time (default 4; 2 when streaming). With
    `keep_streams=False` the residual streams `h` are scored batch by batch (`Activations.scores`) and
    dropped; only the MLP inputs `r` are kept."""
    from d2m_export.architectures import ARCHITECTURES

    arch = ARCHITECTURES[model.config.model_type]
    layers = model.model.layers
    # r: each MLP's input before its norm, caught where that norm is entered; with no norm (OLMo 2), the MLP's
    # own input, scaled by 1 (its RMS-normalised form still compares layers)
    norms = [getattr(layer, arch.mlp_norm) if arch.mlp_norm else layer.mlp for layer in layers]
    gamma = ([norm.weight.detach().float() + arch.norm_offset for norm in norms] if arch.mlp_norm
             else [torch.ones(model.config.hidden_size) for _ in layers])
    eps = float(getattr(norms[0], "variance_epsilon", getattr(norms[0], "eps", model.config.rms_norm_eps))
                if arch.mlp_norm else model.config.rms_norm_eps)
    h: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    r: list[list[torch.Tensor]] = [[] for _ in range(len(layers))]
    scorer = None if keep_streams else BlockScorer()
    batch_size = batch_size or (4 if keep_streams else 2)   # streaming: a batch's scoring temporaries are the peak
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: h[i].append(_hidden(args, kwargs)), with_kwargs=True))
        hooks.append(norms[i].register_forward_pre_hook(
            lambda mod, args, i=i: r[i].append(_flat(args[0]))))
    hooks.append(layers[-1].register_forward_hook(
        lambda mod, args, out: h[-1].append(_flat(out[0] if isinstance(out, tuple) else out))))
    try:
        from tqdm import tqdm
        batches = range(0, len(input_ids), batch_size)
        for start in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            # the decoder alone: the LM head's logits are not needed (at 150k vocabularies, large)
            model.get_decoder()(input_ids=input_ids[start:start + batch_size].to(model.device), use_cache=False)
            if scorer is not None:
                batch = Activations(h=[x.pop() for x in h], r=[x[-1] for x in r], gamma=gamma, eps=eps, tokens=0)
                scorer.update(batch.h, [batch.normalized(i) for i in range(len(r))], gamma)
    finally:
        for hook in hooks:
            hook.remove()
    return Activations(h=[torch.cat(x) for x in h] if scorer is None else [], r=[torch.cat(x) for x in r],
                       gamma=gamma, eps=eps, tokens=int(input_ids.numel()), scores=scorer)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] in the model's own dtype: a bf16 model's activations are bf16 already, and an
    fp32 copy would double the largest thing calibration holds; consumers upcast per layer."""
    return t.reshape(-1, t.shape[-1]).detach().clone()


def _hidden(args, kwargs) -> torch.Tensor:
    return _flat(args[0] if args else kwargs["hidden_states"])
