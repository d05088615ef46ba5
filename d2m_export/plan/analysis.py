"""Redundancy analysis: score every block of consecutive layers (DESIGN.md §1, step 2).

The scores are summed by `calibration.BlockScorer` (re-exported here), which `calibration.collect`
feeds batch by batch."""
from __future__ import annotations

from pathlib import Path

from d2m_export.plan.calibration import Activations, BlockScorer


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
