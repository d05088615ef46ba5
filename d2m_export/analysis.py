"""Redundancy analysis: score every block of consecutive layers (DESIGN.md §1, step 2)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from d2m_export.calibration import Activations


class BlockScorer:
    """What `score_blocks` averages over tokens, summed batch by batch, so that calibration need not keep
    every layer's residual stream (at 3B shapes, more memory than anything else it holds)."""

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


def score_blocks(acts: Activations) -> list[dict]:
    """`BlockScorer.blocks` over activations kept whole."""
    if acts.scores is not None:
        return acts.scores.blocks()
    scorer = BlockScorer()
    scorer.update(acts.h, [acts.normalized(i) for i in range(len(acts.r))], acts.gamma)
    return scorer.blocks()


def block_table(blocks: list[dict]) -> dict[tuple[int, int], dict]:
    return {(b["start"], b["length"]): b for b in blocks}


def plot_heatmap(blocks: list[dict], num_layers: int, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("angular_distance", "angular distance of residual streams\n(lower = more redundant)", "viridis"),
              ("mlp_input_cos", "MLP-input cosine, host vs worst donor\n(higher = safer to fuse)", "magma")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    for ax, (key, label, cmap) in zip(axes, panels):
        grid = np.full((num_layers, num_layers), np.nan)
        for b in blocks:
            grid[b["length"] - 1, b["start"]] = b[key]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap,
                       extent=(-0.5, num_layers - 0.5, 0.5, num_layers + 0.5))
        ax.set_xlabel("block start (layer)")
        ax.set_ylabel("block length (layers)")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
