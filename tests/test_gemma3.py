"""Gemma 3 through every stage: a tiny random Gemma 3 (q/k norms, (1 + w) norms around attention and MLP,
GeGLU, sliding-window layers with their own RoPE base, scaled embeddings, a query scale that is not
1/√head_dim) is analysed, pruned, healed, evaluated, trained and exported to every target with parity in
its runtime; LF-UC and upcycling refuse it (no MoE class holds it exactly). The embedded Gemma 3 270M is
checked against llama.cpp running the very GGUF file it was dequantized from.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, family_workspace, run_cli


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, tokenizer_dir):
    from d2m_export.cli import main

    ws = family_workspace(tmp_path_factory.mktemp("gemma3"), "gemma3_text", tokenizer_dir)
    pruned = ws["root"] / "pruned"
    assert main(["convert", "--model", str(ws["dense"]), "--method", "prune", "--plan", str(ws["root"] / "plan.yaml"),
                 "--calib-tokens", "512", "--out", str(pruned)]) == 0
    return {**ws, "pruned": pruned}


def test_prune_heal_eval_train(capsys, gemma3, tmp_path):
    dense, pruned, root = gemma3["dense"], gemma3["pruned"], gemma3["root"]
    code, _, err = run_cli(capsys, "analyze", "--model", dense, "--calib-tokens", 512, "--out", tmp_path / "an")
    assert code == 0, err
    config = json.loads((pruned / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]     # layers 0, 1, 4, 5 kept
    code, out, err = run_cli(capsys, "heal", "--model", pruned, "--calib-tokens", 1024, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "1←[2, 3]" in out, err
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "healed", "--tasks", "piqa", "--limit", 2,
                           "--ppl-tokens", 1024, "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["value"] > 1
    code, _, err = run_cli(capsys, "train", "--model", pruned, "--corpus", root / "corpus.txt", "--tokens", 256,
                           "--seq-len", 32, "--global-batch", 4, "--micro-batch", 2, "--out", tmp_path / "trained")
    assert code == 0, err


@pytest.mark.parametrize("method, flags", [("lfuc", ["--target-active-ratio", "0.9"]),
                                           ("upcycle", ["--num-experts", "2"])])
def test_moe_conversions_refuse_gemma3(capsys, gemma3, tmp_path, method, flags):
    code, _, err = run_cli(capsys, "convert", "--model", gemma3["dense"], "--method", method, *flags,
                           "--out", tmp_path / "out")
    assert_user_error(code, err, "gemma3_text", "Gemma 4", "--method prune")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, model", [("onnx", "dense"), ("onnx", "pruned"), ("executorch", "dense"),
                                           ("coreml", "dense"), ("coreml", "pruned"), ("gguf", "dense")])
def test_exports_match_transformers(capsys, gemma3, tmp_path, target, model):
    """fp32 parity (Core ML: checked on Linux as the traced program) over 64 greedy tokens, past the
    8-token window, so the sliding layers' masks and RoPE tables are exercised; llama.cpp's GELU reads an
    fp16 table, hence its looser bound. ONNX exports also run in ONNX Runtime GenAI."""
    pytest.importorskip({"executorch": "executorch", "coreml": "coremltools", "gguf": "llama_cpp"}.get(target, "onnx"))
    code, out, err = run_cli(capsys, "--target", target, "--model", gemma3[model], "--threads", 1,
                             "--out", tmp_path / "x")
    assert code == 0 and "greedy 64/64" in out, err
    parity = json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] == 64
    assert parity["max_abs_logit_err"] < (1e-2 if target == "gguf" else 1e-3)


def test_gguf_refuses_a_layer_order_llama_cpp_cannot_hold(capsys, gemma3, tmp_path):
    code, _, err = run_cli(capsys, "--target", "gguf", "--model", gemma3["pruned"], "--out", tmp_path / "x")
    assert_user_error(code, err, "every 6th layer global", "layers [3]")
    assert not (tmp_path / "x").exists()


def test_layer_runner_reproduces_every_layer_exactly(gemma3):
    """Healing runs one layer on its own: with Gemma's norms, banded masks and per-type RoPE it must
    give what the whole model computes."""
    from transformers import AutoModelForCausalLM

    from d2m_export.heal.blocks import collect_blocks
    from d2m_export.heal.fit import relative_error
    from d2m_export.heal.layer import LayerRunner
    from d2m_export.plan import Block, Plan

    model = AutoModelForCausalLM.from_pretrained(gemma3["dense"]).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    plan = Plan("prune", 6, [Block(i, []) for i in range(6)], {})
    for data in collect_blocks(model, plan, ids, progress=False):
        runner = LayerRunner(model, data.layer)
        assert relative_error(runner, data) < 1e-10, data.layer
        with torch.no_grad():
            r = runner.attention(data.x)
            torch.testing.assert_close(r + runner.mlp(runner.ffn_input(r)), runner(data.x), rtol=0, atol=1e-6)


def test_parameter_counts_are_the_stored_parameters(gemma3):
    from transformers import AutoModelForCausalLM

    from d2m_export.sources.params import param_counts

    for path in (gemma3["dense"], gemma3["pruned"]):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert param_counts(model.config).total == sum(p.numel() for p in model.parameters()), path


def test_embedded_gemma3_matches_llama_cpp_on_its_own_gguf():
    """The embedded model is Gemma 3 270M's Q4_K_M GGUF, dequantized by transformers' loader. llama.cpp stores
    Gemma norm weights as (1 + w); a loader that did not undo it would scale every norm by (2 + w). Here
    both read the same quantized weights, so their next-token predictions agree; llama.cpp multiplies
    with 8-bit-quantized activations, hence the tolerance. Measured: every argmax agrees, mean |logit
    difference| 0.26; with the norms left at (1 + w), no argmax agrees and the mean difference is 9.1."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from d2m_export.sources.models import embedded_gguf, load_model
    from runtimes.base import quiet_native_stderr

    model, tokenizer, _ = load_model("gemma3-270m")
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    with quiet_native_stderr():
        llm = llama_cpp.Llama(str(embedded_gguf("gemma3-270m")), n_ctx=128, logits_all=True, verbose=False,
                              n_threads=2)
    assert llm.tokenize(text.encode()) == ids                 # same tokenizer too
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    mean_diff = np.abs(ours - theirs).mean()
    assert agree >= 0.9 and mean_diff < 1.0, (agree, mean_diff)


def test_embedded_gemma3_perplexity_is_what_the_model_gives_with_bos():
    """Gemma expects BOS at the start of every text (lm-eval-harness adds it for Gemma): evaluation windows
    and task contexts start with it. Measured on Austen's first 2,048 tokens: 27.2 (with BOS); 84 without."""
    from d2m_export.sources.corpora import token_windows
    from d2m_export.evaluation import perplexity
    from d2m_export.sources.models import load_model

    model, tokenizer, _ = load_model("gemma3-270m")
    assert (token_windows(tokenizer, "word " * 2000, 512, 1024)[:, 0] == tokenizer.bos_token_id).all()
    assert perplexity(model, tokenizer, tokens=2048, progress=False)["value"] < 35
