"""What a training run leaves behind: its log (`train_log.jsonl`, TensorBoard), the model, the loss plot."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from d2m_export.outputs import MARKER, GENERATOR
from d2m_export.sources.models import read_record
from d2m_export.train.config import TrainConfig


class TrainLog:
    """train_log.jsonl plus TensorBoard event files (when tensorboard is installed)."""

    def __init__(self, out: Path, enabled: bool, start: int):
        self.enabled = enabled
        if not enabled:
            return
        self.path = out / "train_log.jsonl"
        if self.path.exists():   # resuming: drop the steps after the checkpoint, they are redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def finish(out: Path, model, tokenizer, model_dir: Path, cfg: TrainConfig, meta: dict, result: dict,
           stats_before, stats_after) -> None:
    """Write the trained model into `out`; config.json moves in last, so a crash never leaves a
    folder that loads as a model."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = read_record(model_dir) or {"generator": GENERATOR, "base_model": meta["base_model"]}
    record["training"] = {**asdict(cfg), **result, "trained_from": meta["base_model"]}
    (tmp / "d2m_plan.json").write_text(json.dumps(record, indent=2) + "\n")
    if stats_after is not None:
        (tmp / "router_stats.json").write_text(json.dumps(
            {"generator": GENERATOR, "description": "fraction of routed token slots per expert, per MoE layer",
             "before": stats_before, "after": stats_after}, indent=2) + "\n")
    plot_loss(out / "train_log.jsonl", tmp / "loss.png")
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()
    (out / MARKER).write_text(f"{GENERATOR} train\n")


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["loss"] for r in rows], label="total loss")
    ax.plot(tokens, [r["ce"] for r in rows], label="cross-entropy", alpha=0.7)
    if any(r["distill_kl"] for r in rows):
        ax.plot(tokens, [r["distill_kl"] for r in rows], label="KL to teacher", alpha=0.7)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    plt.close(fig)
