"""Training text: packaged corpora by name, the user's .txt/.jsonl/.parquet files, directories of
them or saved Hugging Face datasets, packed into fixed-length token chunks (or token shards:
`shards`). The evaluation corpus is refused here, so it is never trained on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from d2m_export.sources.corpora import CORPORA, load_text
from d2m_export.errors import UserError

DEFAULT_TRAIN_CORPORA = ("brown", "olmo-passages")


def read_source(source: str) -> list[str]:
    """Documents of one source: a packaged training corpus name, a file or a directory."""
    return list(iter_source(source))


def iter_source(source: str) -> Iterator[str]:
    """Documents of one source, streamed: a packaged training corpus name, a .txt/.jsonl/.parquet
    file, a directory of such files (recursively, in name order) or a Hugging Face dataset saved
    with `save_to_disk` (its 'text' column)."""
    if source in CORPORA:
        if CORPORA[source].role != "train":
            raise UserError(f"corpus {source!r} is held out for evaluation and is never trained on; "
                            f"training corpora: {', '.join(n for n, s in CORPORA.items() if s.role == 'train')}")
        yield load_text(source)
        return
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _hf_dataset(path)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"training corpus {path}/ holds no {', '.join(SUFFIXES)} files and is not a "
                            "Hugging Face dataset saved with save_to_disk")
        for f in files:
            yield from _file(f)
        return
    if not path.is_file():
        raise UserError(f"training corpus {source!r} not found: give a file (.txt, .jsonl, .parquet), a directory "
                        f"of them, a saved Hugging Face dataset, or one of "
                        f"{', '.join(n for n, s in CORPORA.items() if s.role == 'train')}")
    yield from _file(path)


SUFFIXES = (".txt", ".jsonl", ".parquet")


def _file(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        if "text" not in f.schema_arrow.names:
            raise UserError(f"{path}: no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
        for batch in f.iter_batches(columns=["text"], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise UserError(f"{path}: unsupported corpus format {path.suffix!r}; use .txt, .jsonl (a 'text' field) "
                        "or .parquet")


def _hf_dataset(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a Hugging Face dataset; reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    splits = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
    for split in splits:
        if "text" not in split.column_names:
            raise UserError(f"{path}: no 'text' column (columns: {', '.join(split.column_names)})")
        for batch in split.iter(batch_size=1024):
            yield from (t for t in batch["text"] if t)


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
