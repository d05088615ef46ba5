"""Training bf16 weights: AdamW's update with fp32 moments and unbiased stochastic rounding; a bf16
checkpoint trains, saves and resumes in bf16; a bf16 teacher gives exactly its fp32 copy's logits."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import cli_argv, kill_at_checkpoint, save_with_tokenizer, tiny_dense, train_log
from d2m_export.cli import main
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan
from d2m_export.train.bf16_adamw import BF16AdamW, stochastic_round_bf16

BASE = ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--lr", "1e-2", "--warmup-steps", "1"]


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value, in magnitude."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    high = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return low, high


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    low, high = bf16_neighbours(x)
    draws = torch.stack([stochastic_round_bf16(x, g).float() for _ in range(400)])
    assert ((draws == low) | (draws == high)).all()
    # mean of 400 draws: the standard error is at most half a step / 20
    assert ((draws.mean(0) - x).abs() <= (high - low).abs() / 10 + 1e-12).float().mean() > 0.99
    assert (draws.mean(0) - x).mean().abs() < 1e-3 * x.abs().mean()      # no drift over the whole tensor
    # an update far below half a bf16 step survives on average; round-to-nearest loses it
    ones = torch.full((100_000,), 1.0 + 1e-3)
    assert ones.to(torch.bfloat16).float().mean() == 1.0
    assert stochastic_round_bf16(ones, g).float().mean().item() == pytest.approx(1.001, abs=1e-4)
    # the same seed, the same rounding
    a = stochastic_round_bf16(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, stochastic_round_bf16(x, torch.Generator().manual_seed(5)))


def _steps(optimizer_cls, params, grads, **kw):
    opt = optimizer_cls(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.to(p.dtype)
        opt.step()
    return opt


def test_the_update_is_torch_adamw_then_rounded(monkeypatch):
    from d2m_export.train import bf16_adamw

    monkeypatch.setattr(bf16_adamw, "CHUNK", 100)      # updated in slices, as a large embedding is
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(64, 32, generator=gen).bfloat16().float(), torch.randn(32, generator=gen).bfloat16().float()]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    # fp32 parameters: exactly torch's AdamW
    ref = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    _steps(torch.optim.AdamW, ref, grads)
    _steps(BF16AdamW, ours, grads)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # bf16 parameters, one step: torch's fp32 result, rounded to one of its two bf16 neighbours
    ref = [p.clone().requires_grad_() for p in start]
    ours = [p.bfloat16().requires_grad_() for p in start]
    _steps(torch.optim.AdamW, ref, grads[:1])
    opt = _steps(BF16AdamW, ours, grads[:1])
    for a, b in zip(ref, ours):
        assert b.dtype == torch.bfloat16
        low, high = bf16_neighbours(a.detach())
        assert ((b.float() == low) | (b.float() == high)).all()
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())


def test_moments_stay_fp32_through_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(16, 16).bfloat16())
    opt = _steps(BF16AdamW, [p], [[torch.randn(16, 16) * 1e-3]])
    before = opt.state[p]["exp_avg_sq"].clone()
    again = BF16AdamW([p], lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(again.state[p]["exp_avg_sq"], before)     # tiny second moments not flushed by bf16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from d2m_export.sources.corpora import load_text

    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(load_text("brown")[:40_000])
    return path


@pytest.fixture(scope="module")
def bf16_moe_dir(tmp_path_factory, tokenizer_dir):
    dense = tiny_dense("llama")
    moe = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(1, [2, 3]), Block(4, [5])],
                                               Options(host_mode="shared", router_init="zero", top_k=1)))
    with torch.no_grad():
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 1.0)
    return save_with_tokenizer(moe.to(torch.bfloat16), tmp_path_factory.mktemp("moe") / "tiny-moe-bf16", tokenizer_dir)


def _dtypes(model_dir) -> set:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_bf16_checkpoint_trains_and_saves_in_bf16(bf16_moe_dir, corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(bf16_moe_dir), "--corpus", str(corpus), "--tokens", str(12 * 4 * 32),
                 *BASE, "--out", str(out)]) == 0
    rows = train_log(out)
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3          # it learns
    assert _dtypes(out) == {"BF16"}
    assert json.loads((out / "d2m_plan.json").read_text())["training"]["weights_dtype"] == "bf16"
    fp32 = tmp_path / "fp32"                             # the choice stays the user's
    assert main(["train", "--model", str(bf16_moe_dir), "--corpus", str(corpus), "--tokens", str(2 * 4 * 32),
                 *BASE, "--weights-dtype", "fp32", "--out", str(fp32)]) == 0
    assert _dtypes(fp32) == {"F32"}


def test_bf16_sigkill_then_resume_matches_uninterrupted(capsys, bf16_moe_dir, corpus, tmp_path):
    args = ["train", "--model", bf16_moe_dir, "--corpus", corpus, "--tokens", 6 * 4 * 32, *BASE, "--save-every", 2]
    ref = subprocess.run(cli_argv(*args, "--out", tmp_path / "ref"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    kill_at_checkpoint(cli_argv(*args, "--out", out), out, 2)
    optim = torch.load(out / "checkpoints" / "step-000002" / "optim.pt", weights_only=True)["optimizer"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in optim["state"].values())
    resumed = subprocess.run(cli_argv(*args, "--out", out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in train_log(out)] == [r["loss"] for r in train_log(tmp_path / "ref")]
    code = main(list(map(str, [*args, "--out", out, "--resume", "--weights-dtype", "fp32"])))
    assert code == 2 and "weights_dtype" in capsys.readouterr().err   # a bf16 run does not resume as fp32


def test_a_bf16_teacher_distils_exactly_as_its_fp32_copy(bf16_moe_dir, corpus, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    fp32_teacher = save_with_tokenizer(AutoModelForCausalLM.from_pretrained(bf16_moe_dir, dtype=torch.float32),
                                       tmp_path / "teacher-fp32", tokenizer_dir)
    student = save_with_tokenizer(tiny_dense("llama", seed=2), tmp_path / "student", tokenizer_dir)
    logs = []
    for name, teacher in (("bf16", bf16_moe_dir), ("fp32", fp32_teacher)):
        out = tmp_path / f"kd-{name}"
        assert main(["train", "--model", str(student), "--distill-from", str(teacher), "--corpus", str(corpus),
                     "--tokens", str(2 * 4 * 32), *BASE, "--out", str(out)]) == 0
        logs.append([(r["loss"], r["distill_kl"]) for r in train_log(out)])
    assert logs[0] == logs[1]


@pytest.mark.parametrize("problem", ["unknown-dtype", "bf16-fp32-compute", "memory"])
def test_bad_input(capsys, monkeypatch, bf16_moe_dir, corpus, tmp_path, problem):
    extra = {"unknown-dtype": ["--weights-dtype", "fp16"], "bf16-fp32-compute": ["--dtype", "fp32"],
             "memory": []}[problem]
    if problem == "memory":
        monkeypatch.setenv("D2M_MEMORY_LIMIT_GB", "0.5")
    code = main(list(map(str, ["train", "--model", bf16_moe_dir, "--corpus", corpus, "--tokens", 256, *extra,
                               "--out", tmp_path / "o"])))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("d2m-export: error:")
    assert {"unknown-dtype": "--weights-dtype", "bf16-fp32-compute": "--dtype fp32",
            "memory": "needs about"}[problem] in err
    assert not (tmp_path / "o").exists()


def test_the_memory_check_counts_the_state_of_the_trained_weights_only(capsys, monkeypatch, bf16_moe_dir, corpus,
                                                                        tmp_path):
    # Adam's moments and the gradients are kept for what is trained: --train-only moe needs less, and
    # a run refused for training everything says so
    from d2m_export.sources.memory import RUNTIME_BYTES
    from d2m_export.train.config import TrainConfig, train_memory_need, trainable_count

    assert 0 < trainable_count(bf16_moe_dir, "router") < trainable_count(bf16_moe_dir, "moe") \
        < trainable_count(bf16_moe_dir, "all")
    cfg = TrainConfig(model=str(bf16_moe_dir), out="", weights_dtype="bf16", seq_len=32, micro_batch=2)
    everything, moe = (train_memory_need(cfg, which)[0] + RUNTIME_BYTES for which in ("all", "moe"))
    monkeypatch.setenv("D2M_MEMORY_LIMIT_GB", f"{(everything + moe) / 2 / 2**30:.6f}")
    argv = ["train", "--model", bf16_moe_dir, "--corpus", corpus, "--tokens", 2 * 4 * 32, *BASE]
    assert main(list(map(str, [*argv, "--out", tmp_path / "all"]))) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "--train-only moe: about" in err
    assert not (tmp_path / "all").exists()
    assert main(list(map(str, [*argv, "--train-only", "moe", "--out", tmp_path / "moe"]))) == 0
