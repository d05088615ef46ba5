"""train's device options: --compile, --device, and the throughput and MFU it logs."""
from __future__ import annotations

import json

import pytest

from conftest import save_with_tokenizer, tiny_dense
from d2m_export.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    from d2m_export.sources.corpora import load_text

    root = tmp_path_factory.mktemp("device")
    (root / "corpus.txt").write_text(load_text("brown")[:20_000])
    return save_with_tokenizer(tiny_dense("llama"), root / "tiny", tokenizer_dir), root / "corpus.txt"


def train(setup, out, *extra) -> list[dict]:
    model, corpus = setup
    assert main(list(map(str, ["train", "--model", model, "--corpus", corpus, "--tokens", 3 * 8 * 32, "--seq-len", 32,
                               "--micro-batch", 4, "--global-batch", 8, "--lr", "1e-2", *extra, "--out", out]))) == 0
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_compile_gives_the_same_losses_and_every_step_logs_throughput_and_mfu(setup, tmp_path):
    import torch._dynamo

    eager = train(setup, tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(setup, tmp_path / "compiled", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0        # it did compile
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    for row in eager:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    record = json.loads((tmp_path / "eager" / "d2m_plan.json").read_text())["training"]
    assert record["device"] == "cpu" and record["dtype"] == "fp32"       # auto on a CPU machine
    assert record["peak_flops_source"].startswith("measured")
    given = train(setup, tmp_path / "given", "--peak-tflops", "1")
    assert given[-1]["mfu"] == pytest.approx(given[-1]["tokens_per_s"] * record["flops_per_token"] / 1e12)


def test_cuda_without_a_gpu_is_refused(setup, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, corpus = setup
    code = main(["train", "--model", str(model), "--corpus", str(corpus), "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and not (tmp_path / "o").exists()
