"""Redundancy analysis: score every block of consecutive layers (DESIGN.md §1, step 2)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from d2m_export.calibration import Activations


def score_blocks(acts: Activations) -> list[dict]:
    """Every block (start, length): the residual's angular distance across it (Gromov et al.;
    ShortGPT's BI for length 1), and how well the host's MLP input stands in for each donor's
    own, min over donors, each donor's γ applied: mean_t cos(γ_d ⊙ x̂_host, γ_d ⊙ x̂_d)."""
    num_layers = len(acts.r)
    unit = torch.nn.functional.normalize(torch.stack(acts.h), dim=-1)             # [L+1, T, H]
    x_hat = torch.stack([acts.normalized(i) for i in range(num_layers)])           # [L, T, H]
    angular = {}
    for start in range(num_layers):
        cos = (unit[start] * unit[start + 1:]).sum(-1).double().clamp(-1, 1)     # [L-start, T]
        for n, d in enumerate((torch.arccos(cos) / math.pi).mean(-1).tolist(), start=1):
            angular[start, n] = d
    donor_cos = {}
    for donor in range(1, num_layers):
        w = acts.gamma[donor].pow(2)
        hosts = x_hat[:donor]
        num = (hosts * x_hat[donor]) @ w                                          # [donor, T]
        den = (hosts.pow(2) @ w).sqrt() * (x_hat[donor].pow(2) @ w).sqrt()
        for host, c in enumerate((num / den.clamp_min(1e-12)).double().mean(-1).tolist()):
            donor_cos[host, donor] = c
    return [{"start": start, "length": n, "angular_distance": angular[start, n],
             "mlp_input_cos": min((donor_cos[start, d] for d in range(start + 1, start + n)), default=1.0)}
            for start in range(num_layers) for n in range(1, num_layers - start + 1)]


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
