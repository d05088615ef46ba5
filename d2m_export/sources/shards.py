"""Token shards: a corpus tokenized once into memory-mapped files that training streams from.

SHARDS/ holds `shard-00000.bin`, ... (the token stream, documents joined by EOS, little-endian
uint16 when the vocabulary fits, else uint32) and `index.json` (dtype, per-shard token and
document counts, the tokenizer's hash). Training cuts the stream into fixed-length chunks and
reads a batch's chunks straight from the maps, so its memory does not grow with the corpus; the
order of chunks is a seeded permutation computed per index (no table of all chunks), so a run
resumes at any step without saving loader state.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from d2m_export.errors import UserError
from d2m_export.outputs import atomic_dir

FORMAT = "d2m-token-shards/1"
INDEX = "index.json"


def tokenizer_hash(tokenizer) -> str:
    """What makes two tokenizers give the same ids: the fast tokenizer's full definition, or else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_shards(tokenizer, documents: Iterator[str], out: Path, shard_tokens: int = 100_000_000,
                 sources: list[str] | None = None, model: str = "", progress: bool = True) -> dict:
    """Tokenize `documents` into `out` (written whole or not at all); the index."""
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 2 ** 16 else np.uint32).newbyteorder("<")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate documents with")
    shards: list[dict] = []
    started = time.time()
    from tqdm import tqdm

    with atomic_dir(out) as tmp:
        fh, current = None, {"tokens": 0, "documents": 0}

        def roll():
            nonlocal fh, current
            if fh is not None:
                fh.close()
                shards.append(current)
            current = {"file": f"shard-{len(shards):05d}.bin", "tokens": 0, "documents": 0}
            fh = open(tmp / current["file"], "wb")

        roll()
        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
        for batch in _batches(documents, 256):
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                ids = np.asarray([*ids, eos], dtype=dtype)
                while len(ids):
                    if current["tokens"] >= shard_tokens:
                        roll()
                    take = ids[:shard_tokens - current["tokens"]]
                    fh.write(take.tobytes())
                    current["tokens"] += len(take)
                    ids = ids[len(take):]
                current["documents"] += 1
            bar.update(len(batch))
        bar.close()
        fh.close()
        shards.append(current)
        shards = [s for s in shards if s["tokens"]]
        tokens = sum(s["tokens"] for s in shards)
        if tokens == 0:
            raise UserError(f"no text in {', '.join(sources or [])}: nothing to tokenize")
        for f in tmp.glob("shard-*.bin"):
            if f.stat().st_size == 0:
                f.unlink()
        index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab, "eos_token_id": eos,
                 "tokenizer": {"model": model, "hash": tokenizer_hash(tokenizer)},
                 "documents": sum(s["documents"] for s in shards), "tokens": tokens, "shards": shards,
                 "sources": sources or [], "wall_s": round(time.time() - started, 1)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _batches(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        if item and item.strip():
            batch.append(item)
            if len(batch) == n:
                yield batch
                batch = []
    if batch:
        yield batch


def read_index(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--data {path}: not a directory of token shards (make one with `d2m-export tokenize`)")
    if not (path / INDEX).is_file():
        raise UserError(f"--data {path}: no {INDEX}, so no token shards (make them with `d2m-export tokenize`)")
    try:
        index = json.loads((path / INDEX).read_text())
    except ValueError:
        raise UserError(f"--data {path}/{INDEX} is not valid JSON; make the shards again") from None
    if index.get("format") != FORMAT:
        raise UserError(f"--data {path}: shard format {index.get('format')!r}, this version reads {FORMAT!r}")
    if not index.get("tokens"):
        raise UserError(f"--data {path}: the shards hold no tokens")
    for s in index["shards"]:
        f = path / s["file"]
        size = np.dtype(index["dtype"]).itemsize * s["tokens"]
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"--data {path}: {s['file']} is missing or not {size} bytes; make the shards again")
    return index


class ShardChunks:
    """The shards' token stream as `len(self)` chunks of `seq_len` tokens (the tail dropped):
    `self[ids]` reads those chunks into a [len(ids), seq_len] int64 tensor."""

    def __init__(self, path: Path, seq_len: int, tokenizer=None):
        self.path, self.index = Path(path), read_index(path)
        if tokenizer is not None and self.index["tokenizer"]["hash"] != tokenizer_hash(tokenizer):
            raise UserError(f"--data {path} was tokenized with another tokenizer "
                            f"(that of {self.index['tokenizer']['model'] or 'an unnamed model'}, hash "
                            f"{self.index['tokenizer']['hash']}) than the model's (hash {tokenizer_hash(tokenizer)}); "
                            f"tokenize the corpus again with --model set to the model you train")
        self.seq_len = seq_len
        self.maps = [np.memmap(self.path / s["file"], dtype=np.dtype(self.index["dtype"]).newbyteorder("<"), mode="r")
                     for s in self.index["shards"]]
        self.starts = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self.n = int(self.starts[-1]) // seq_len
        if self.n == 0:
            raise UserError(f"--data {path} holds {int(self.starts[-1])} tokens, fewer than one sequence of {seq_len}")
        self.shape = (self.n, seq_len)

    def __len__(self) -> int:
        return self.n

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        out, pos = [], start
        while pos < stop:
            s = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[s + 1]))
            out.append(self.maps[s][pos - self.starts[s]:end - self.starts[s]])
            pos = end
        return np.concatenate(out) if len(out) > 1 else out[0]

    def __getitem__(self, ids) -> torch.Tensor:
        if isinstance(ids, slice):
            ids = range(*ids.indices(self.n))
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        rows = [self._tokens(i * self.seq_len, (i + 1) * self.seq_len).astype(np.int64) for i in ids]
        return torch.from_numpy(np.stack(rows))

    def digest(self) -> str:
        """Names the data for caches: the index (token counts, tokenizer) and the sequence length."""
        return hashlib.sha256((json.dumps(self.index["shards"]) + self.index["tokenizer"]["hash"]
                               + str(self.seq_len)).encode()).hexdigest()


def permuted(i: int, n: int, seed: int) -> int:
    """Position i of a seeded random permutation of range(n), computed alone (no table of n entries):
    a 4-round Feistel network on the smallest even number of bits that holds n, re-applied while
    the result falls outside range(n) (cycle walking keeps it a bijection of range(n))."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    while True:
        left, right = i >> half, i & mask
        for r in range(4):
            h = hashlib.blake2b(f"{seed}:{r}:{right}".encode(), digest_size=8).digest()
            left, right = right, left ^ (int.from_bytes(h, "little") & mask)
        i = (left << half) | right
        if i < n:
            return i


def stream_batch_indices(num_chunks: int, step: int, global_batch: int, seed: int) -> torch.Tensor:
    """Like data.batch_indices (a fresh permutation per epoch, resumable by step) without holding a
    permutation of every chunk: memory is one batch whatever the corpus size."""
    start = step * global_batch
    out = []
    for j in range(start, start + global_batch):
        epoch, offset = divmod(j, num_chunks)
        out.append(permuted(offset, num_chunks, seed + epoch))
    return torch.tensor(out)
