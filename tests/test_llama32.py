"""Llama 3.2 (issue 35): `llama3` RoPE and tied embeddings, through LF-UC and every export target.

A tiny model whose config.json is Llama-3.2-1B's, key for key and in the same layout (`rope_scaling` with
`rope_type: llama3`, factor 32, low/high frequency factors 1/4, original context 8192, θ 500000; tied
embeddings; 64-wide heads, 4:1 grouped KV heads; 131072 positions), with only the sizes shrunk (layers,
width, heads, vocabulary: the test tokenizer's). Its q/k projections are drawn wider than the initializer's
so that attention is sharp, as in a trained model: then where a key sits, and so RoPE far back, moves the
greedy tokens.

- LF-UC with convert's defaults (--no-heal): a Qwen2-MoE that keeps the RoPE.
- fp32 exports with full parity in their runtimes: onnx (ONNX Runtime and onnxruntime-genai), gguf (stock
  llama.cpp: the dense `llama` file and the LF-UC `step35` file, each with llama.cpp's `rope_freqs`
  divisors), executorch (executorch.runtime) and coreml (its lowered module in PyTorch, as on Linux).
- Past the original context: a prompt after 8300 tokens of context, greedy decoding in ONNX Runtime,
  onnxruntime-genai and llama.cpp equal to transformers.
- A GGUF file without the divisors fails the parity check; RoPE a target cannot hold exactly is refused
  before any work in one line naming the target and the RoPE type.
- yarn RoPE (its original context shrunk to 64): fp32 parity past it in onnx, gguf (dense and LF-UC, the
  attention factor folded into q and k), executorch and coreml.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import CONVERT_DENSE, assert_user_error, run_cli, save_with_tokenizer, tiny_dense

# Llama-3.2-1B's config.json as published, with the sizes that shrink and the token ids, which must be
# the test tokenizer's, set below
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
# The MLP stays wide beside the 49k-token LM head, so that convert's default active ratio (0.8) is reachable
# (as conftest's CONVERT_DENSE); the weights are stored (and so declared) as float32.
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
              "num_hidden_layers": 6, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float32"}
QK_STD = 0.25           # q/k projection weights: sharp attention (the initializer's 0.02 makes it uniform)
CONTEXT = 8300          # tokens before the prompt in the long-context check: past the original 8192
NEW = 16
PROMPT = "The quick brown fox jumps over the lazy dog."


def tiny_llama32():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**LLAMA32_1B, **TINY_SIZES}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0, QK_STD)
    return model, config


@pytest.fixture(scope="module")
def llama32(tmp_path_factory, tokenizer_dir):
    """{"dense": the tiny Llama 3.2 folder, "lfuc": convert's output from it}; convert run with its defaults."""
    root = tmp_path_factory.mktemp("llama32")
    model, config = tiny_llama32()
    dense = save_with_tokenizer(model, root / "dense", tokenizer_dir)
    (dense / "config.json").write_text(json.dumps(config, indent=2))   # the published layout (rope_scaling)
    code = run_cli_plain("convert", "--model", dense, "--no-heal", "--out", root / "lfuc")
    assert code == 0
    return {"dense": dense, "lfuc": root / "lfuc"}


def run_cli_plain(*argv) -> int:
    from d2m_export.cli import main

    return main([str(a) for a in argv])


def test_the_tiny_model_reads_as_llama32_and_lfuc_keeps_its_rope(llama32):
    from transformers import AutoConfig, AutoModelForCausalLM

    written = json.loads((llama32["dense"] / "config.json").read_text())
    assert written.keys() == LLAMA32_1B.keys() and written["rope_scaling"] == LLAMA32_1B["rope_scaling"]
    dense = AutoModelForCausalLM.from_pretrained(llama32["dense"])
    assert dense.model.rotary_emb.rope_type == "llama3" and dense.config.tie_word_embeddings

    cfg = AutoConfig.from_pretrained(llama32["lfuc"])
    assert cfg.model_type == "qwen2_moe" and cfg.tie_word_embeddings
    assert cfg.rope_parameters == {**LLAMA32_1B["rope_scaling"], "rope_theta": 500000.0}
    assert cfg.num_hidden_layers < 6 and cfg.mlp_only_layers       # some layers fused, some kept dense
    moe = AutoModelForCausalLM.from_pretrained(llama32["lfuc"])
    assert moe.model.rotary_emb.rope_type == "llama3"
    assert torch.equal(moe.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)


def llama3_divisors(head_dim=64, theta=500000.0, factor=32.0, low=1.0, high=4.0, original=8192):
    """Llama 3's frequency rule, written from its definition: wavelengths under original/high keep their
    frequency, over original/low are slowed by `factor`, between them blended; as divisors of θ_i."""
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)


TARGETS = [  # (target, model, extra flags)
    ("onnx", "lfuc", []),
    ("gguf", "lfuc", []),
    ("gguf", "dense", []),
    ("executorch", "lfuc", ["--max-seq-len", 128]),
    ("coreml", "lfuc", ["--max-seq-len", 128]),
]
MODULES = {"onnx": "onnxruntime", "gguf": "llama_cpp", "executorch": "executorch", "coreml": "coremltools"}


@pytest.fixture(scope="module")
def exported(llama32, tmp_path_factory):
    """exported(target, model) -> the export folder, made once (the long-context checks reuse it)."""
    root, made = tmp_path_factory.mktemp("llama32-exports"), {}

    def make(target, model, flags=()):
        if (target, model) not in made:
            out = root / f"{target}-{model}"
            code = run_cli_plain("--target", target, "--model", llama32[model], *flags, "--threads", 2, "--out", out)
            assert code == 0, f"{target} export of the {model} model failed"
            made[target, model] = out
        return made[target, model]

    return make


@pytest.mark.parametrize("target, model, flags", TARGETS, ids=[f"{t}-{m}" for t, m, _ in TARGETS])
def test_fp32_export_matches_transformers(exported, target, model, flags):
    pytest.importorskip(MODULES[target])
    out = exported(target, model, flags)
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] >= 64
    assert parity["max_abs_logit_err"] < 1e-4
    for other in (parity.get("other_runtimes") or {}).values():          # onnxruntime-genai
        assert other["greedy_match"] == other["greedy_total"] and other["max_abs_logit_err"] < 1e-4
    if target == "onnx":
        assert "onnxruntime-genai" in parity["other_runtimes"]
    if target == "coreml":
        assert parity["checked_on"] == "pytorch-lowered-module" and parity["free_running_greedy_identical"]
    if target == "gguf":
        import gguf

        reader = gguf.GGUFReader(out / manifest["files"][0])
        tensors = {t.name: t for t in reader.tensors}
        # llama.cpp's per-dimension divisors, equal to Llama 3's rule written out independently
        assert np.allclose(np.asarray(tensors["rope_freqs.weight"].data), llama3_divisors(), rtol=1e-6, atol=0)
        arch = reader.fields["general.architecture"].contents()
        rope = manifest["gguf"]["rope"]
        assert rope["type"] == "llama3" and rope["frequency_divisors"] == "rope_freqs.weight"
        if model == "dense":
            assert arch == "llama" and "identity_swa_layer" not in rope
            assert reader.fields["llama.block_count"].contents() == 6
        else:   # step35 applies no divisors to its SWA layer: an appended identity layer takes the flag
            layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]   # the LF-UC model's
            assert arch == "step35" and rope["identity_swa_layer"] == layers
            assert reader.fields["step35.block_count"].contents() == layers + 1
            assert reader.fields["step35.attention.sliding_window_pattern"].contents() == [False] * layers + [True]
            assert reader.fields["step35.attention.head_count"].contents() == [4] * layers + [1]
            for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
                assert not np.asarray(tensors[f"blk.{layers}.{name}.weight"].data).any()
            assert not any(n.startswith(f"blk.{layers}.ffn_") and "norm" not in n for n in tensors)


@pytest.fixture(scope="module")
def long_reference(llama32):
    """CONTEXT random tokens, then PROMPT; transformers' greedy tokens and their logits from there. The
    prompt is fed in chunks into one cache (the attention of one 8k-token call would not fit lightly)."""
    import inspect

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(llama32["lfuc"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama32["lfuc"])
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(100, 49000, CONTEXT)] + tokenizer(PROMPT)["input_ids"]
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    tokens, logits = [], []
    with torch.no_grad():
        for start in range(0, len(ids), 1024):
            row = model(input_ids=torch.tensor([ids[start:start + 1024]]), use_cache=True, logits_to_keep=1,
                        **{key: cache}).logits[0, -1]
        for _ in range(NEW):
            logits.append(row.float().numpy().copy())
            tokens.append(int(row.argmax()))
            row = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{key: cache}).logits[0, -1]
    assert len(set(tokens)) > 3          # the tokens depend on the context: a real check, not a constant
    return ids, tokens, np.stack(logits)


@pytest.mark.parametrize("target, runtime", [("onnx", None), ("onnx", "onnxruntime-genai"), ("gguf", None)])
def test_greedy_past_the_original_context_equals_transformers(exported, long_reference, target, runtime):
    """Teacher-forced logits at positions 8300+ and the runtime's own argmax at every step: equal argmax at
    every step is the runtime's free-running greedy decoding reproducing transformers' tokens."""
    pytest.importorskip({"onnx": "onnxruntime_genai" if runtime else "onnxruntime", "gguf": "llama_cpp"}[target])
    from converters.parity import runtime_forced
    from runtimes.base import load_runner

    ids, tokens, ref = long_reference
    assert len(ids) > 8192
    options = {"kv_type": "f32"} if target == "gguf" else {}
    with load_runner(exported(target, "lfuc"), threads=2, n_ctx=len(ids) + NEW + 8,
                     **({"runtime": runtime} if runtime else {}), **options) as runner:
        got = runtime_forced(runner, ids, tokens)
    assert list(got.argmax(-1)) == tokens
    assert np.abs(got - ref).max() < 1e-2      # llama.cpp computes its own angles: ~5e-4 here; ONNX: ~4e-6


def test_gguf_without_the_divisors_fails_parity(llama32, tmp_path, capsys, monkeypatch):
    """The parity check sees llama3 RoPE: the same file with plain RoPE (no rope_freqs) is refused."""
    pytest.importorskip("llama_cpp")
    import converters.gguf
    import converters.gguf_tensors

    for module in (converters.gguf, converters.gguf_tensors):     # the tensors and the manifest's account
        monkeypatch.setattr(module, "rope_freq_factors", lambda cfg: None)
    code, _, err = run_cli(capsys, "--target", "gguf", "--model", llama32["dense"], "--threads", 2,
                           "--out", tmp_path / "out")
    assert code == 1 and "parity check failed" in err, err
    assert not (tmp_path / "out").exists()


LLAMA3_ROPE = dict(LLAMA32_1B["rope_scaling"], rope_theta=500000.0)


@pytest.mark.parametrize("target, arch, rope", [
    ("gguf", "qwen2", LLAMA3_ROPE),           # llama.cpp's qwen2 reads no rope_freqs
    ("gguf", "llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}),
    ("onnx", "llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}),
    ("executorch", "llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}),
    ("coreml", "llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}),
])
def test_rope_a_target_cannot_hold_is_refused_before_any_work(tmp_path, tokenizer_dir, capsys, monkeypatch,
                                                              target, arch, rope):
    pytest.importorskip(MODULES[target])
    import d2m_export.sources.models

    model_dir = save_with_tokenizer(tiny_dense(arch, num_hidden_layers=2, rope_parameters=rope), tmp_path / arch,
                                    tokenizer_dir)
    monkeypatch.setattr(d2m_export.sources.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "--target", target, "--model", model_dir, "--out", tmp_path / "out")
    assert_user_error(code, err, f"the {target} target", repr(rope["rope_type"]))
    assert not (tmp_path / "out").exists()


# yarn (Qwen2.5's and DeepSeek's long-context RoPE) as Qwen2.5 writes it, with the original context shrunk to 64
# so that the parity check's 313-position text runs past it: its frequencies are fixed per dimension (a table
# holds them at any position) and it scales cos and sin by an attention factor (1.139 at factor 4)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def yarn_models(tmp_path_factory, tokenizer_dir):
    """A tiny Llama with yarn RoPE and sharp attention, and its LF-UC conversion (convert's defaults)."""
    root = tmp_path_factory.mktemp("yarn")
    model = tiny_dense("llama", num_hidden_layers=4, rope_parameters=YARN, **CONVERT_DENSE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.normal_(0, QK_STD)
    dense = save_with_tokenizer(model, root / "dense", tokenizer_dir)
    assert run_cli_plain("convert", "--model", dense, "--no-heal", "--out", root / "lfuc") == 0
    return {"dense": dense, "lfuc": root / "lfuc"}


YARN_CASES = [("onnx", "dense"), ("gguf", "dense"), ("gguf", "lfuc"), ("executorch", "lfuc"), ("coreml", "lfuc")]


@pytest.mark.parametrize("target, model", YARN_CASES, ids=[f"{t}-{m}" for t, m in YARN_CASES])
def test_yarn_exports_match_transformers_past_the_original_context(yarn_models, capsys, tmp_path, target, model):
    """fp32 parity over 64 greedy tokens and the 313-position text (past the original 64): llama.cpp with
    yarn's frequencies as `rope_freqs` divisors and its attention factor folded into q and k (dense `llama`
    and LF-UC `step35`), the table targets with transformers' own table."""
    pytest.importorskip(MODULES[target])
    flags = ["--max-seq-len", 256] if target in ("executorch", "coreml") else []
    code, out, err = run_cli(capsys, "--target", target, "--model", yarn_models[model], *flags, "--threads", 2,
                             "--out", tmp_path / "x")
    assert code == 0, err
    parity = json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] >= 64 and parity["max_abs_logit_err"] < 1e-3
    if target != "coreml":
        assert parity["text"]["positions"] > 64 and parity["text"]["top1_agreement"] == 1.0
