"""train --fsdp (FSDP2 over gloo processes on the CPU): the loss curve of one process, sharded
checkpoints that survive SIGKILL and resume on another number of processes, bf16 mixed
precision, activation checkpointing, and refusals. The loss curve and the crash are checked on a
tiny dense Llama and on what `convert` writes by default (LF-UC, routed host: a Qwen2-MoE whose
shared experts have no elements, which FSDP2 cannot shard); so are an upcycled model and bf16
compute on the default one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cli_argv, kill_at_checkpoint, same_weights_layout, save_with_tokenizer, tiny_dense, train_log
from d2m_export.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    from d2m_export.sources.corpora import load_text

    root = tmp_path_factory.mktemp("fsdp")
    (root / "corpus.txt").write_text(load_text("brown")[:40_000])
    model = save_with_tokenizer(tiny_dense("llama"), root / "tiny", tokenizer_dir)
    return model, root / "corpus.txt"


def args(setup, steps: int, *extra):
    model, corpus = setup
    return ["train", "--model", model, "--corpus", corpus, "--tokens", steps * 8 * 32, "--seq-len", 32,
            "--micro-batch", 2, "--global-batch", 8, "--lr", "1e-2", "--warmup-steps", 1, *extra]


def single(argv):
    return cli_argv(*argv)


def launched(argv, n: int, port: int):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port),
            "-m", "d2m_export.cli", *map(str, argv)]


def run(cmd):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out):
    return [row["loss"] for row in train_log(out)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """references(setup, steps, *flags): one ordinary process's curve, which FSDP runs must reproduce."""
    curves = {}

    def of(setup, steps: int = 6, *flags):
        if (setup, steps, flags) not in curves:
            out = tmp_path_factory.mktemp("ref") / "ref"
            run(single(args(setup, steps, *flags, "--out", out)))
            curves[setup, steps, flags] = losses(out)
        return curves[setup, steps, flags]

    return of


@pytest.fixture(scope="module")
def reference(setup, references):
    """One ordinary process, 6 steps, on the dense model."""
    return references(setup)


MODELS = ["dense", "lfuc"]      # the tiny dense Llama; `convert`'s default output


@pytest.fixture(scope="module", params=MODELS)
def model(request, setup, converted, references):
    """(name, setup, 6-step reference curve) of each of MODELS."""
    chosen = setup if request.param == "dense" else (converted(request.param), setup[1])
    return request.param, chosen, references(chosen)


def port(base: int, name: str) -> int:
    return base + 20 * MODELS.index(name)


def test_two_fsdp_processes_match_one(model, tmp_path):
    from transformers import AutoModelForCausalLM

    name, setup, reference = model
    run(launched(args(setup, 6, "--fsdp", "--out", tmp_path / "two"), 2, port(29541, name)))
    assert losses(tmp_path / "two") == pytest.approx(reference, rel=1e-5)
    AutoModelForCausalLM.from_pretrained(tmp_path / "two")       # the gathered model saves whole
    same_weights_layout(tmp_path / "two", setup[0])


def test_accelerate_launch_matches_one_process(setup, reference, tmp_path):
    """accelerate's multi-process launcher (`--multi_gpu` starts torchrun-style ranks, on the CPU too)."""
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
         "--main_process_port", "29548", "-m", "d2m_export.cli",
         *map(str, args(setup, 6, "--fsdp", "--out", tmp_path / "acc"))])
    assert losses(tmp_path / "acc") == pytest.approx(reference, rel=1e-5)


def test_sigkill_then_resume_on_two_and_on_one_process(model, tmp_path):
    name, setup, reference = model
    out = tmp_path / "killed"
    kill_at_checkpoint(launched(args(setup, 6, "--fsdp", "--save-every", 2, "--out", out), 2, port(29542, name)),
                       out, 4, ENV)
    assert not (out / "config.json").exists()
    saved = json.loads((out / "checkpoints" / "step-000004" / "trainer.json").read_text())
    assert saved["world_size"] == 2
    shutil.copytree(out, tmp_path / "killed-1")
    run(launched(args(setup, 6, "--fsdp", "--save-every", 2, "--out", out, "--resume"), 2, port(29543, name)))
    run(launched(args(setup, 6, "--fsdp", "--save-every", 2, "--out", tmp_path / "killed-1", "--resume"), 1,
                 port(29544, name)))
    for resumed in (out, tmp_path / "killed-1"):
        curve = losses(resumed)
        assert curve[-1] == pytest.approx(reference[-1], rel=1e-5), resumed
        assert (resumed / "config.json").is_file()
        same_weights_layout(resumed, setup[0])


OTHER_RUNS = [                               # (layout, flags, rel. tolerance to one fp32 process)
    ("upcycle", [], 1e-5),                  # every layer MoE, each with an empty shared expert
    ("lfuc", ["--dtype", "bf16", "--train-only", "moe"], 2e-2),   # empty shared experts computed in bf16
]


@pytest.mark.parametrize("layout, flags, rel", OTHER_RUNS)
def test_more_layouts_and_flags_match_one_process(setup, converted, references, tmp_path, layout, flags, rel):
    chosen = (converted(layout), setup[1])
    reference = references(chosen, 3, *[f for f in flags if f not in ("--dtype", "bf16")])
    run(launched(args(chosen, 3, "--fsdp", *flags, "--out", tmp_path / "two"), 2,
                 29581 + OTHER_RUNS.index((layout, flags, rel))))
    assert losses(tmp_path / "two") == pytest.approx(reference, rel=rel)
    if "bf16" in flags:
        assert losses(tmp_path / "two") != reference
    same_weights_layout(tmp_path / "two", chosen[0])


def test_bf16_mixed_precision_and_activation_checkpointing(setup, reference, tmp_path):
    run(launched(args(setup, 6, "--fsdp", "--activation-checkpointing", "--out", tmp_path / "ckpt"), 2, 29545))
    assert losses(tmp_path / "ckpt") == pytest.approx(reference, rel=1e-5)   # recomputation changes nothing
    run(launched(args(setup, 6, "--fsdp", "--dtype", "bf16", "--out", tmp_path / "bf16"), 2, 29546))
    bf16 = losses(tmp_path / "bf16")
    assert bf16 != reference and bf16 == pytest.approx(reference, rel=2e-2)


def test_fsdp_without_a_launcher_is_refused(setup, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    code = main(list(map(str, args(setup, 2, "--fsdp", "--out", tmp_path / "o"))))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "torchrun" in err, err
    assert not (tmp_path / "o").exists()


def test_a_sharded_checkpoint_is_not_resumed_without_fsdp(setup, tmp_path, capsys):
    out = tmp_path / "sharded"
    run(launched(args(setup, 4, "--fsdp", "--save-every", 2, "--out", out), 1, 29547))
    (out / "config.json").unlink()
    capsys.readouterr()
    code = main(list(map(str, args(setup, 4, "--save-every", 2, "--out", out, "--resume"))))
    err = capsys.readouterr().err
    assert code == 2 and "--fsdp" in err.strip().splitlines()[-1], err
