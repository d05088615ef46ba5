"""OLMo 2 (issue 35): norms on the attention and MLP outputs only, and q/k norms over the whole projection.

A tiny model whose config.json has OLMo-2-0425-1B's keys and layout (untied embeddings; q/k RMSNorm over
every head at once; post-attention and post-feedforward norms, no input norms), sizes shrunk (4 layers,
64 wide, 8 heads of 8; the test tokenizer's vocabulary). Its q/k projections are drawn wide and its norm weights
away from 1, so that a norm in the wrong place, or q/k normed per head, moves the greedy tokens.

- Every export of it with fp32 parity: onnx (ONNX Runtime and onnxruntime-genai; its 8-wide heads padded to
  the GQA kernel's 16, so the whole-projection norm over padded heads is exercised), gguf (llama.cpp's
  own `olmo2`), executorch, coreml (its lowered module in PyTorch, as on Linux).
- prune keeps OLMo 2, exact against the model with the donor deleted; LF-UC and upcycling are refused in one
  line naming why; analyze, eval and train take it; the pruned model heals (layers without input norms).
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_user_error, run_cli
from test_families import analyze_eval_train, export_with_fp32_parity, loaded, logits, published_tiny

OLMO2_1B = {
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": None, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "olmo2",
    "num_attention_heads": 16, "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 100277,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.48.3", "use_cache": True, "vocab_size": 100352,
}
TINY = {**OLMO2_1B, "hidden_size": 64, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 8,
        "num_hidden_layers": 4, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("olmo2")
    dense, model = published_tiny(TINY, root / "dense", tokenizer_dir)
    (root / "plan.yaml").write_text("blocks:\n  - {host: 1, donors: [2]}\n")
    return {"dense": dense, "model": model, "root": root}


def test_prune_is_exact(olmo2, tmp_path):
    from d2m_export.cli import main

    assert main(["convert", "--model", str(olmo2["dense"]), "--method", "prune", "--plan",
                 str(olmo2["root"] / "plan.yaml"), "--no-heal", "--calib-tokens", "256", "--out",
                 str(tmp_path / "prune")]) == 0
    reference = copy.deepcopy(olmo2["model"])
    del reference.model.layers[2]
    model = loaded(tmp_path / "prune")
    assert type(model).__name__ == "Olmo2ForCausalLM" and model.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


TARGETS = ["onnx", "gguf", "executorch", "coreml"]


@pytest.mark.parametrize("target", TARGETS)
def test_exports_match_transformers(capsys, olmo2, tmp_path, target):
    export_with_fp32_parity(capsys, olmo2["dense"], target, tmp_path / "x")


@pytest.mark.parametrize("method", ["lfuc", "upcycle"])
def test_lfuc_and_upcycle_are_refused_naming_why(capsys, olmo2, tmp_path, method):
    code, _, err = run_cli(capsys, "convert", "--model", olmo2["dense"], "--method", method, "--out", tmp_path / "x")
    assert_user_error(code, err, "olmo2 models cannot be converted to MoE", "OLMo 2's layout")
    assert not (tmp_path / "x").exists()


def test_analyze_eval_train(capsys, olmo2, tmp_path):
    analyze_eval_train(capsys, olmo2["dense"], tmp_path, "olmo2")


def test_a_pruned_olmo2_heals(capsys, olmo2, tmp_path):
    """Healing a pruned OLMo 2 runs its layers without input norms (the local heal reruns each kept layer)."""
    code, _, err = run_cli(capsys, "convert", "--model", olmo2["dense"], "--method", "prune", "--plan",
                           olmo2["root"] / "plan.yaml", "--no-heal", "--calib-tokens", 256, "--out", tmp_path / "p")
    assert code == 0, err
    code, out, err = run_cli(capsys, "heal", "--model", tmp_path / "p", "--calib-tokens", 512, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "healed" in out, err
    assert loaded(tmp_path / "healed").config.model_type == "olmo2"
