"""The teacher's top-k log-probabilities on the training chunks, computed once and kept on disk.

Distillation runs the dense teacher forward on every micro-batch, about a third of a CPU step,
and every run of a sweep repeats it on the same chunks. With `--teacher-topk K` the teacher
runs once per chunk, before training, and the student's KL term reads the K largest
log-probabilities and their token ids from two memory-mapped arrays (fp16 values, int32 ids).
The teacher's distribution is renormalised over those K tokens; `mass` records how much of it
they held. The cache is keyed by everything its contents depend on (teacher weights, the
packed chunks, K), so a changed teacher or corpus never reads stale entries.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2m_export.errors import UserError
from d2m_export.paths import cache_dir

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
SAMPLE_BYTES = 1 << 20          # the weights are fingerprinted by their names, sizes and first MiB


def default_root() -> Path:
    return cache_dir() / "teacher_topk"


def weights_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256((Path(model_dir) / "config.json").read_bytes() if (Path(model_dir) / "config.json").is_file()
                       else b"")
    for pattern in WEIGHT_FILES:
        for f in sorted(Path(model_dir).glob(pattern)):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


class TeacherTopK:
    """`logp[c]`, `ids[c]`: the K best next-token log-probabilities at every position but the last of chunk c."""

    def __init__(self, root: Path, teacher_dir: Path, chunks: torch.Tensor, k: int):
        if k < 1:
            raise UserError(f"--teacher-topk must be at least 1, not {k}")
        n, seq = chunks.shape
        key = {"teacher": weights_fingerprint(teacher_dir), "k": k, "seq_len": seq, "chunks": n,
               "data": chunks.digest() if hasattr(chunks, "digest")       # token shards: their index
               else hashlib.sha256(chunks.to(torch.int64).numpy().tobytes()).hexdigest()}
        self.k = k
        self.dir = Path(root) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps(key, indent=2) + "\n")
        shape = (n, seq - 1, k)
        fresh = not (self.dir / "done.npy").is_file()
        mode = "w+" if fresh else "r+"
        self.logp = np.lib.format.open_memmap(self.dir / "logp.npy", mode=mode, dtype=np.float16, shape=shape)
        self.ids = np.lib.format.open_memmap(self.dir / "ids.npy", mode=mode, dtype=np.int32, shape=shape)
        self.done = np.zeros(n, bool) if fresh else np.load(self.dir / "done.npy")
        if fresh:
            self._save_done()

    def _save_done(self) -> None:
        """After the arrays are flushed, so a chunk marked done is on disk whatever happens next."""
        tmp = self.dir / "done.tmp.npy"
        np.save(tmp, self.done)
        os.replace(tmp, self.dir / "done.npy")

    def missing(self, chunk_ids) -> list[int]:
        return sorted({int(c) for c in chunk_ids if not self.done[int(c)]})

    @torch.no_grad()
    def fill(self, teacher, chunks: torch.Tensor, chunk_ids: list[int], batch: int, progress: bool = True) -> int:
        """Run the teacher on the chunks not cached yet; how many it ran on."""
        todo = self.missing(chunk_ids)
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc=f"teacher top-{self.k}", unit="chunk")
        device = next(teacher.parameters()).device
        for i in range(0, len(todo), batch):
            ids = todo[i:i + batch]
            logits = teacher(input_ids=chunks[ids].to(device), use_cache=False).logits[:, :-1].float()
            top, idx = logits.log_softmax(-1).topk(self.k, dim=-1)
            self.logp[ids] = top.cpu().numpy().astype(np.float16)
            self.ids[ids] = idx.cpu().numpy().astype(np.int32)
            self.logp.flush()
            self.ids.flush()
            self.done[ids] = True
            self._save_done()
            if bar is not None:
                bar.update(len(ids))
        if bar is not None:
            bar.close()
        return len(todo)

    def get(self, chunk_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T-1, K] fp32 log-probabilities and int64 token ids of these chunks."""
        ids = chunk_ids.tolist()
        return (torch.from_numpy(np.asarray(self.logp[ids], np.float32)).to(device),
                torch.from_numpy(np.asarray(self.ids[ids], np.int64)).to(device))

    def mass(self, chunk_ids) -> float:
        """Mean teacher probability the cached tokens hold, over these chunks."""
        return float(np.exp(np.asarray(self.logp[sorted(set(int(c) for c in chunk_ids))], np.float32)).sum(-1).mean())


def topk_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) with the teacher renormalised over its cached top-k tokens; student_logits
    [B, T-1, V] (the positions that have a next token)."""
    s_logp = student_logits.log_softmax(-1).gather(-1, t_ids)
    t_logp = t_logp - t_logp.logsumexp(-1, keepdim=True)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.float().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean()
