"""Token shards: `tokenize` from every kind of corpus source, `train --data` streaming from them with
flat memory, exact resume, and refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli_argv, kill_at_checkpoint, save_with_tokenizer, tiny_dense, train_log
from d2m_export.cli import main

TRAIN = ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--lr", "1e-2", "--warmup-steps", "1"]


cli = cli_argv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return save_with_tokenizer(tiny_dense("llama"), tmp_path_factory.mktemp("model") / "tiny", tokenizer_dir)


@pytest.fixture(scope="module")
def documents():
    from d2m_export.sources.corpora import load_text

    text = load_text("brown")[:60_000]
    return [p for p in text.split("\n\n") if p.strip()][:120]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, documents):
    """The same documents spread over a .txt file, a directory with nested .jsonl and .parquet files,
    and a Hugging Face dataset saved to disk."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("sources")
    (root / "one.txt").write_text(documents[0])
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[1:40]))
    pq.write_table(pa.table({"text": documents[40:80]}), root / "dir" / "sub" / "b.parquet")
    datasets.Dataset.from_dict({"text": documents[80:]}).save_to_disk(str(root / "hf"))
    return [root / "one.txt", root / "dir", root / "hf"]


def test_tokenize_reads_every_source_kind_into_shards(model_dir, sources, documents, tmp_path, capsys):
    from transformers import AutoTokenizer

    from d2m_export.sources.shards import ShardChunks

    out = tmp_path / "shards"
    assert main(["tokenize", *map(str, sources), "--model", str(model_dir), "--shard-tokens", "1000",
                 "--out", str(out)]) == 0
    assert "tokenized 120 documents" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = [t for d in documents for t in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert index["dtype"] == "uint16" and index["documents"] == 120 and index["tokens"] == len(expected)
    assert len(index["shards"]) == -(-len(expected) // 1000) > 1
    stream = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in index["shards"]])
    assert stream.tolist() == expected
    chunks = ShardChunks(out, 64, tok)           # chunks that straddle a shard boundary read whole
    assert len(chunks) == len(expected) // 64
    for i in (0, 1000 // 64, len(chunks) - 1):
        assert chunks[[i]][0].tolist() == expected[i * 64:(i + 1) * 64]


def test_the_stream_order_is_a_permutation_per_epoch():
    from d2m_export.sources.shards import stream_batch_indices

    epoch = [int(i) for s in range(5) for i in stream_batch_indices(20, s, 4, seed=0)]
    assert sorted(epoch) == list(range(20)) and epoch != list(range(20))
    assert [int(i) for i in stream_batch_indices(20, 5, 4, seed=0)] != epoch[:4]      # epoch 2: another order


@pytest.fixture(scope="module")
def shards(model_dir, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    assert main(["tokenize", *map(str, sources), "--model", str(model_dir), "--out", str(out)]) == 0
    return out


def test_sigkill_then_resume_from_shards_matches_uninterrupted(model_dir, shards, tmp_path):
    args = ["train", "--model", model_dir, "--data", shards, "--tokens", 10 * 4 * 32, *TRAIN, "--save-every", 2]
    ref = subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    kill_at_checkpoint(cli(*args, "--out", out), out, 4)
    resumed = subprocess.run(cli(*args, "--out", out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_log(tmp_path / "ref"), train_log(out)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-7)


def _peak_rss_mb(argv) -> float:
    """Peak RSS of `argv`, read by a fresh wrapper process whose only child it is."""
    wrapper = ("import json, resource, subprocess, sys; r = subprocess.run(json.loads(sys.argv[1]), "
               "capture_output=True, text=True); sys.stderr.write(r.stderr[-2000:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    run = subprocess.run([sys.executable, "-c", wrapper, json.dumps([str(a) for a in argv])],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1]) / 1024


def _random_corpora(documents, tmp_path, model_dir, docs: tuple[int, int]) -> list:
    """Two .jsonl corpora of random Brown words, the second `docs[1] / docs[0]` times the first, each
    also tokenized into shards (the path without its suffix)."""
    rng = np.random.default_rng(0)
    words = "\n\n".join(documents).split()
    paths = []
    for name, n in zip(("small", "large"), docs):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 2000))}) + "\n" for _ in range(n)))
        assert main(["tokenize", str(path), "--model", str(model_dir), "--out", str(path.with_suffix(""))]) == 0
        paths.append(path)
    return paths


def test_training_from_shards_keeps_memory_flat_when_the_corpus_grows_tenfold(model_dir, documents, tmp_path):
    """Shards of ~0.25M and ~2.5M tokens: the same peak RSS of a whole `train --data` (± 10%)."""
    small, large = _random_corpora(documents, tmp_path, model_dir, (100, 1000))
    budget = ["--tokens", 4 * 4 * 32, *TRAIN]
    peak = {p.stem: _peak_rss_mb(cli("train", "--model", model_dir, "--data", p.with_suffix(""), *budget,
                                     "--out", tmp_path / f"out-{p.stem}")) for p in (small, large)}
    assert abs(peak["large"] / peak["small"] - 1) < 0.10, peak


def test_reading_shards_allocates_per_batch_not_per_corpus(model_dir, documents, tmp_path):
    """The data path alone, under tracemalloc (numpy's buffers included): ten batches from shards
    allocate the same whatever the corpus size, while packing the corpus in memory, as --corpus
    does, grows with it (the control: at training scale its growth is lost in the process's
    ~550 MB, measured 572 → 592 MB for 0.25M → 2.5M tokens)."""
    import tracemalloc

    from transformers import AutoTokenizer

    from d2m_export.sources.data import pack
    from d2m_export.sources.shards import ShardChunks, stream_batch_indices

    tok = AutoTokenizer.from_pretrained(model_dir)

    def peak(fn) -> int:
        tracemalloc.start()
        fn()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    def stream(path):
        chunks = ShardChunks(path.with_suffix(""), 32, tok)
        for step in range(10):
            chunks[stream_batch_indices(len(chunks), step, 16, 0)]

    small, large = _random_corpora(documents, tmp_path, model_dir, (10, 100))
    streamed = {p.stem: peak(lambda: stream(p)) for p in (small, large)}
    packed = {p.stem: peak(lambda: pack(tok, [str(p)], 32)) for p in (small, large)}
    assert streamed["large"] < 1.1 * streamed["small"] + 16_384, streamed
    grew = packed["large"] - packed["small"]
    assert packed["large"] > 5 * packed["small"] and grew > 100 * max(streamed["large"] - streamed["small"], 16_384), \
        (packed, streamed)


@pytest.mark.parametrize("problem", ["empty-dir", "not-shards", "both", "other-tokenizer", "bad-source"])
def test_bad_input(problem, model_dir, shards, tmp_path, capsys, tokenizer_dir):
    from transformers import AutoTokenizer

    argv = ["train", "--model", model_dir, "--data", shards, "--tokens", 256, *TRAIN, "--out", tmp_path / "o"]
    if problem == "empty-dir":
        (tmp_path / "empty").mkdir()
        argv[4] = tmp_path / "empty"
    elif problem == "not-shards":
        argv[4] = tmp_path / "nope"
    elif problem == "both":
        argv += ["--corpus", "brown"]
    elif problem == "other-tokenizer":     # the model's tokenizer with one token more
        other = save_with_tokenizer(tiny_dense("llama"), tmp_path / "other", tokenizer_dir)
        tok = AutoTokenizer.from_pretrained(other)
        tok.add_tokens(["<d2m-extra>"])
        tok.save_pretrained(other)
        argv[2] = other
    elif problem == "bad-source":
        argv = ["tokenize", "brown", tmp_path / "missing.jsonl", "--model", model_dir, "--out", tmp_path / "o"]
    capsys.readouterr()
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err, err
    assert not (tmp_path / "o").exists()
    if problem == "other-tokenizer":
        assert "another tokenizer" in err
