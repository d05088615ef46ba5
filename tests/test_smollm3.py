"""SmolLM3 (issue 35): Llama whose every fourth layer applies no RoPE (NoPE).

A tiny model whose config.json has SmolLM3-3B's keys and layout (`no_rope_layers`, every fourth 0; tied
embeddings; 4:1 grouped KV heads), sizes shrunk to 8 layers (two NoPE), 64 wide, the test tokenizer's
vocabulary. q/k projections are drawn wide so that attention is sharp: a NoPE layer given RoPE, or the
reverse, moves the greedy tokens.

- Every export of it with fp32 parity: onnx (ONNX Runtime and onnxruntime-genai), gguf (llama.cpp's own
  `smollm3`), executorch, coreml (its lowered module in PyTorch, as on Linux).
- prune keeps SmolLM3, each kept layer with its RoPE or NoPE, exact against the model with the donor deleted;
  its onnx export keeps parity, and gguf refuses it in one line (llama.cpp fixes NoPE at every fourth layer).
- LF-UC and upcycling are refused in one line naming why; analyze, eval and train take it; the pruned model heals.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_user_error, run_cli
from test_families import analyze_eval_train, export_with_fp32_parity, loaded, logits, published_tiny

SMOLLM3_3B = {
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 65536, "max_window_layers": 28, "mlp_bias": False,
    "model_type": "smollm3", "no_rope_layer_interval": 4, "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 4, "pad_token_id": 128004, "pretraining_tp": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.54.0.dev0", "use_cache": False,
    "use_sliding_window": False, "vocab_size": 128256,
}
LAYERS = 8
TINY = {**SMOLLM3_3B, "hidden_size": 64, "intermediate_size": 2048, "num_attention_heads": 4,
        "num_key_value_heads": 1, "num_hidden_layers": LAYERS, "vocab_size": 49152, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(LAYERS)],
        "layer_types": ["full_attention"] * LAYERS}


@pytest.fixture(scope="module")
def smollm3(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("smollm3")
    dense, model = published_tiny(TINY, root / "dense", tokenizer_dir)
    (root / "plan.yaml").write_text("blocks:\n  - {host: 1, donors: [2]}\n")
    return {"dense": dense, "model": model, "root": root}


def test_nope_layers_matter(smollm3):
    """The model is SmolLM3 with its NoPE layers; the same weights with RoPE everywhere differ."""
    from transformers import AutoModelForCausalLM

    assert type(smollm3["model"]).__name__ == "SmolLM3ForCausalLM"
    everywhere = AutoModelForCausalLM.from_pretrained(smollm3["dense"], no_rope_layers=[1] * LAYERS).eval()
    assert (logits(everywhere) - logits(smollm3["model"])).abs().max() > 1e-2


@pytest.fixture(scope="module")
def pruned(smollm3):
    out = smollm3["root"] / "prune"
    from d2m_export.cli import main

    assert main(["convert", "--model", str(smollm3["dense"]), "--method", "prune", "--plan",
                 str(smollm3["root"] / "plan.yaml"), "--no-heal", "--calib-tokens", "256", "--out", str(out)]) == 0
    return out


def test_prune_keeps_each_layers_rope_exactly(smollm3, pruned):
    reference = copy.deepcopy(smollm3["model"])
    del reference.model.layers[2]                # each layer keeps its own use_rope
    model = loaded(pruned)
    assert type(model).__name__ == "SmolLM3ForCausalLM"
    assert model.config.no_rope_layers == [1, 1, 0, 1, 1, 1, 0]
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


TARGETS = [("onnx", "dense"), ("gguf", "dense"), ("executorch", "dense"), ("coreml", "dense"), ("onnx", "prune")]


@pytest.mark.parametrize("target, model", TARGETS, ids=[f"{t}-{m}" for t, m in TARGETS])
def test_exports_match_transformers(capsys, smollm3, pruned, tmp_path, target, model):
    export_with_fp32_parity(capsys, smollm3["dense"] if model == "dense" else pruned, target, tmp_path / "x")


def test_gguf_refuses_nope_layers_llama_cpp_does_not_fix(capsys, pruned, tmp_path):
    pytest.importorskip("llama_cpp")
    code, _, err = run_cli(capsys, "--target", "gguf", "--model", pruned, "--out", tmp_path / "x")
    assert_user_error(code, err, "llama.cpp's smollm3", "every 4th layer", "differ at [2, 3")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["lfuc", "upcycle"])
def test_lfuc_and_upcycle_are_refused_naming_why(capsys, smollm3, tmp_path, method):
    code, _, err = run_cli(capsys, "convert", "--model", smollm3["dense"], "--method", method, "--out", tmp_path / "x")
    assert_user_error(code, err, "smollm3 models cannot be converted to MoE", "without RoPE")
    assert not (tmp_path / "x").exists()


def test_analyze_eval_train(capsys, smollm3, tmp_path):
    analyze_eval_train(capsys, smollm3["dense"], tmp_path, "smollm3")


def test_a_pruned_smollm3_heals(capsys, pruned, tmp_path):
    """Healing a pruned SmolLM3 reruns each kept layer with its own RoPE or NoPE."""
    code, out, err = run_cli(capsys, "heal", "--model", pruned, "--calib-tokens", 512, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "healed" in out, err
    assert loaded(tmp_path / "healed").config.no_rope_layers == [1, 1, 0, 1, 1, 1, 0]
