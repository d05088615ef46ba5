"""CPT on tiny models: losses, distributed equivalence, crash + resume, outputs, bad input; training and
resuming every layout `convert` writes (the `converted` fixture)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CONVERTED_LAYOUTS, cli_argv, kill_at_checkpoint, same_weights_layout, tiny_dense, train_log
from d2m_export.cli import main
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

BASE = ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--lr", "1e-2", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from d2m_export.sources.corpora import load_text

    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(load_text("brown")[:40_000])
    return path


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tokenizer_dir):
    dense = tiny_dense("llama")
    moe = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(1, [2, 3]), Block(4, [5])],
                                               Options(host_mode="shared", router_init="zero", top_k=1)))
    with torch.no_grad():   # a random router, so that routing varies from token to token
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 1.0)
    out = tmp_path_factory.mktemp("moe") / "tiny-moe"
    moe.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


log_of, cli = train_log, cli_argv


def test_train_writes_model_logs_and_router_stats(tiny_moe_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_moe_dir), "--corpus", str(corpus), "--tokens", str(12 * 4 * 32),
                 *BASE, "--z-loss-weight", "1e-3", "--out", str(out)]) == 0
    rows = log_of(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3          # it learns
    assert all(r["balance"] > 0 for r in rows)
    stats = json.loads((out / "router_stats.json").read_text())
    assert len(stats["after"]) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in stats["after"])
    assert (out / "loss.png").stat().st_size > 0 and list((out / "tensorboard").iterdir())
    assert json.loads((out / "d2m_plan.json").read_text())["training"]["tokens"] == 12 * 4 * 32
    AutoModelForCausalLM.from_pretrained(out)


def test_train_only_router_leaves_everything_else(tiny_moe_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "router"
    assert main(["train", "--model", str(tiny_moe_dir), "--corpus", str(corpus), "--tokens", str(2 * 4 * 32),
                 *BASE, "--train-only", "router", "--out", str(out)]) == 0
    before, after = load_file(tiny_moe_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.gate." in k for k in changed)


def test_distillation_from_the_dense_teacher(tiny_moe_dir, corpus, tmp_path):
    out = tmp_path / "kd"
    assert main(["train", "--model", str(tiny_moe_dir), "--distill-from", str(tiny_moe_dir), "--corpus", str(corpus),
                 "--tokens", str(2 * 4 * 32), *BASE, "--out", str(out)]) == 0
    first = log_of(out)[0]
    assert first["distill_kl"] < 1e-5    # the student starts as the teacher itself


def test_topk_kl_is_the_full_kl_when_k_is_the_vocabulary_and_close_when_the_teacher_is_peaked():
    from d2m_export.train.teacher_cache import full_kl, topk_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 300, generator=g), 4 * torch.randn(2, 5, 300, generator=g)
    t_logp = teacher.log_softmax(-1)
    full = full_kl(student, teacher)
    top, ids = t_logp.topk(300, dim=-1)
    assert torch.allclose(topk_kl(student, top, ids), full, atol=1e-5)
    top, ids = t_logp.topk(32, dim=-1)
    mass = top.exp().sum(-1).mean().item()
    assert mass > 0.9 and abs(topk_kl(student, top, ids) - full) < 0.15 * full


def test_teacher_topk_is_computed_once_then_read_from_disk(tiny_moe_dir, corpus, tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    teacher = tmp_path / "teacher"
    tiny_dense("llama", seed=3).save_pretrained(teacher)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, teacher / f.name)
    args = ["train", "--model", tiny_moe_dir, "--corpus", corpus, "--tokens", 3 * 4 * 32, *BASE,
            "--distill-from", teacher, "--teacher-topk", 8, "--teacher-cache", tmp_path / "cache"]
    records = []
    for run in ("first", "second"):
        assert main([*map(str, args), "--out", str(tmp_path / run)]) == 0
        records.append(json.loads((tmp_path / run / "d2m_plan.json").read_text())["training"]["teacher_topk"])
    first, second = records
    assert first["chunks_computed"] > 0 and second["chunks_computed"] == 0 and first["cache"] == second["cache"]
    assert 0 < first["mass"] <= 1.0001
    assert all(r["distill_kl"] > 0 for r in log_of(tmp_path / "first"))
    a, b = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)      # the cached teacher gives the same training
    # another teacher is another cache entry, never the stale one
    other = tmp_path / "other-teacher"
    tiny_dense("llama", seed=4).save_pretrained(other)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, other / f.name)
    args[args.index(teacher)] = other
    assert main([*map(str, args), "--out", str(tmp_path / "third")]) == 0
    third = json.loads((tmp_path / "third" / "d2m_plan.json").read_text())["training"]["teacher_topk"]
    assert third["chunks_computed"] > 0 and third["cache"] != first["cache"]


def test_two_processes_match_one(converted, corpus, tmp_path):
    """DDP on `convert`'s default output (routed host: zero-element shared experts)."""
    args = ["train", "--model", converted("lfuc"), "--corpus", corpus, "--tokens", 4 * 4 * 32, *BASE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(cli(*args, "--out", tmp_path / "one"), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "d2m_export.cli", *map(str, args), "--out", str(tmp_path / "two")]
    double = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_sigkill_then_resume_matches_uninterrupted(tiny_moe_dir, corpus, tmp_path):
    args = ["train", "--model", tiny_moe_dir, "--corpus", corpus, "--tokens", 10 * 4 * 32, *BASE, "--save-every", 2]
    ref = subprocess.run(cli(*args, "--out", tmp_path / "ref"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    kill_at_checkpoint(cli(*args, "--out", out), out, 4)
    assert not (out / "config.json").exists()          # no final model after a crash
    resumed = subprocess.run(cli(*args, "--out", out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = log_of(tmp_path / "ref"), log_of(out)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-6, abs=1e-7)
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2


@pytest.mark.parametrize("layout", list(CONVERTED_LAYOUTS))
def test_every_converted_layout_trains_and_resumes(converted, corpus, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    model = converted(layout)
    args = ["train", "--model", model, "--corpus", corpus, "--tokens", 4 * 4 * 32, *BASE, "--save-every", 2]
    assert main([*map(str, args), "--out", str(tmp_path / "whole")]) == 0
    resumed = tmp_path / "resumed"        # from the step-2 checkpoint of the run above
    shutil.copytree(tmp_path / "whole" / "checkpoints", resumed / "checkpoints")
    assert main([*map(str, args), "--out", str(resumed), "--resume"]) == 0
    assert [r["loss"] for r in log_of(resumed)] == [r["loss"] for r in log_of(tmp_path / "whole")][2:]
    same_weights_layout(resumed, model)       # zero-element shared experts and bf16 kept as `convert` wrote them
    AutoModelForCausalLM.from_pretrained(resumed)


def _err(capsys, argv):
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("problem", ["empty", "missing", "eval-corpus", "seq-len", "not-a-model",
                                     "topk-without-teacher", "topk-negative"])
def test_bad_input(capsys, tiny_moe_dir, corpus, tmp_path, problem):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model, extra = tiny_moe_dir, ["--corpus", corpus]
    if problem == "empty":
        extra = ["--corpus", empty]
    elif problem == "missing":
        extra = ["--corpus", tmp_path / "nope.txt"]
    elif problem == "eval-corpus":
        extra = ["--corpus", "austen"]
    elif problem == "seq-len":
        extra += ["--seq-len", "100000"]
    elif problem == "not-a-model":
        model = tmp_path
    elif problem == "topk-without-teacher":
        extra += ["--teacher-topk", "8"]
    elif problem == "topk-negative":
        extra += ["--distill-from", tiny_moe_dir, "--teacher-topk", "-1"]
    code, err = _err(capsys, ["train", "--model", model, *extra, "--tokens", 256, "--out", tmp_path / "o"])
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("d2m-export: error:")
    assert not (tmp_path / "o").exists()


def test_resume_from_a_different_model_is_refused(capsys, tiny_moe_dir, corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    args = ["--corpus", corpus, "--tokens", 4 * 4 * 32, *BASE, "--save-every", 2, "--out", out]
    assert main(["train", "--model", str(tiny_moe_dir), *map(str, args)]) == 0
    other = tmp_path / "other"
    tiny_dense("llama", seed=1, num_hidden_layers=3).save_pretrained(other)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, other / f.name)
    code, err = _err(capsys, ["train", "--model", other, *args, "--resume"])
    assert code == 2 and "different model" in err, err
