"""Families beyond Llama/Qwen2 through every stage on the command line: a tiny random Qwen3 (per-head
q/k norms) is analysed, converted (lfuc, prune, upcycle, lfuc with --heal), healed, evaluated,
trained, taken back to dense (moe2dense) and exported to every target with parity in its runtime.
The exactness identities are in test_surgery.py and test_moe2dense.py; llama.cpp's free-running
greedy decoding in test_gguf.py.

Mistral, Granite 3.x dense and Phi-4-mini, shaped as the published models, are read as Llama (Granite's
multipliers folded into its weights; Phi's fused projections split, its partial rotary and longrope held): the view equals the family's own model, LF-UC at an empty plan, LF-UC with a zero
router and prune are exact against it, and every target exports them with fp32 parity. A windowed Mistral,
and families we do not read (GPT-2, Mamba), are refused in one line with nothing written.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, family_workspace, run_cli, save_with_tokenizer
from d2m_export.cli import main

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_dir):
    return family_workspace(tmp_path_factory.mktemp("qwen3"), "qwen3", tokenizer_dir)


def config(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("method, flags, model_type", [
    ("lfuc", ["--target-active-ratio", "0.9"], "qwen3_moe"),
    ("lfuc", ["--plan", "PLAN", "--host-mode", "shared", "--heal", "--heal-tokens", "1024", "--heal-steps", "2"],
     "qwen3_moe"),
    ("prune", ["--target-active-ratio", "0.9"], "qwen3"),
    ("upcycle", ["--num-experts", "2"], "qwen3_moe"),
])
def test_convert(capsys, qwen3, tmp_path, method, flags, model_type):
    flags = [str(qwen3["root"] / "plan.yaml") if f == "PLAN" else f for f in flags]
    code, out, err = run_cli(capsys, "convert", "--model", qwen3["dense"], "--method", method, *flags,
                             "--calib-tokens", 512, "--out", tmp_path / "out")
    assert code == 0, err
    cfg = config(tmp_path / "out")
    assert cfg["model_type"] == model_type
    if "--heal" in flags:
        assert "healed on 1024 calibration tokens" in out


def test_analyze_heal_eval_train_moe2dense_gguf(capsys, qwen3, tmp_path):
    dense, root = qwen3["dense"], qwen3["root"]
    code, _, err = run_cli(capsys, "analyze", "--model", dense, "--calib-tokens", 512, "--out", tmp_path / "an")
    assert code == 0, err
    lfuc = tmp_path / "lfuc"
    code, _, err = run_cli(capsys, "convert", "--model", dense, "--plan", root / "plan.yaml", "--calib-tokens", 512,
                           "--no-heal", "--out", lfuc)
    assert code == 0, err
    code, out, err = run_cli(capsys, "heal", "--model", lfuc, "--calib-tokens", 1024, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "1←[2, 3]" in out, err
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "healed", "--tasks", "piqa", "--limit", 2,
                           "--ppl-tokens", 1024, "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["value"] > 1
    code, _, err = run_cli(capsys, "train", "--model", lfuc, "--corpus", root / "corpus.txt", "--tokens", 256,
                           "--seq-len", 32, "--global-batch", 4, "--micro-batch", 2, "--out", tmp_path / "trained")
    assert code == 0, err
    assert config(tmp_path / "trained")["model_type"] == "qwen3_moe"
    code, _, err = run_cli(capsys, "convert", "--model", tmp_path / "trained", "--method", "moe2dense",
                           "--experts-kept", 1, "--calib-tokens", 512, "--out", tmp_path / "back")
    assert code == 0, err
    assert config(tmp_path / "back")["model_type"] == "qwen3"
    for model in (tmp_path / "healed", tmp_path / "back"):
        code, out, err = run_cli(capsys, "--target", "gguf", "--model", model, "--threads", 1,
                                 "--out", tmp_path / f"gguf-{model.name}")
        assert code == 0 and "greedy 64/64" in out, err


@pytest.fixture(scope="module")
def qwen3_lfuc(qwen3):
    """LF-UC with the shared host, which Qwen3-MoE holds folded into every expert."""
    out = qwen3["root"] / "lfuc-shared"
    code = main(
        ["convert", "--model", str(qwen3["dense"]), "--plan", str(qwen3["root"] / "plan.yaml"), "--host-mode",
         "shared", "--calib-tokens", "512", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("target, model", [("onnx", "dense"), ("onnx", "lfuc"), ("executorch", "lfuc"),
                                           ("coreml", "lfuc")])
def test_exports_match_transformers(capsys, qwen3, qwen3_lfuc, tmp_path, target, model):
    """q/k norms in each graph: fp32 (Core ML: its fp16 export, checked on Linux as the traced program)
    gives transformers' greedy tokens; the tiny 8-wide heads are padded to 16 in ONNX, so the padded
    head norm is exercised too. ONNX exports are also run in ONNX Runtime GenAI."""
    if target == "executorch":
        pytest.importorskip("executorch")
    if target == "coreml":
        pytest.importorskip("coremltools")
    src = qwen3["dense"] if model == "dense" else qwen3_lfuc
    code, out, err = run_cli(capsys, "--target", target, "--model", src, "--threads", 1, "--out", tmp_path / "x")
    assert code == 0 and "greedy 64/64" in out, err
    parity = json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] == 64 and parity["max_abs_logit_err"] < 1e-4
    if target == "onnx":
        genai = parity["other_runtimes"]["onnxruntime-genai"]
        assert genai["greedy_match"] == 64 and genai["max_abs_logit_err"] < 1e-4


# --- Mistral and Granite 3.x dense, read as Llama (issue 35) ----------------------------------------------
# Each tiny model's config.json has the published model's keys and layout, with the sizes shrunk (4 layers,
# 64 wide, 4 heads over 1 KV head as 32 over 8, the test tokenizer's vocabulary and token ids); the weights
# are stored (and so declared) as float32. Mistral-Nemo's head_dim, unequal to hidden/heads, is kept on a
# Mistral-7B-v0.3 shape. The MLPs are wide beside the 49k-token LM head so that convert's default active
# ratio (0.8) is reachable (as conftest's CONVERT_DENSE).
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 32768,
}
GRANITE_33_2B = {
    "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": True,
    "vocab_size": 49159,
}
# Phi-4-mini-instruct: fused qkv_proj and gate_up_proj, RoPE on 96 of each 128-wide head (partial rotary
# 0.75) with longrope (short and long factor lists, original context 4096 of 131072), tied embeddings. Shrunk,
# the head is 32 wide (24 turned, 12 factors: the published 48 long factors taken every fourth; short ones
# made distinct from them so that a mix-up of the two shows).
PHI4_LONG_FACTOR = [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
                    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
                    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
                    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
                    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
                    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 199999,
    "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3", "num_attention_heads": 24,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
    "pad_token_id": 199999, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": PHI4_LONG_FACTOR, "short_factor": PHI4_LONG_FACTOR, "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064,
}
SHRUNK = {"hidden_size": 64, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
          "num_hidden_layers": 4, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
PUBLISHED = {"mistral": {**MISTRAL_7B_V03, **SHRUNK, "head_dim": 32},       # Mistral-Nemo: 128 beside 5120/32
             "granite": {**GRANITE_33_2B, **SHRUNK, "pad_token_id": 0},
             "phi3": {**PHI4_MINI, **SHRUNK, "hidden_size": 128, "pad_token_id": 2,
                      "rope_scaling": {"type": "longrope", "long_factor": PHI4_LONG_FACTOR[::4],
                                       "short_factor": [1.0 + 0.01 * i for i in range(12)]}}}
# view against the family's own model: exact (Mistral), or to fp32 rounding where something is folded (Granite's
# multipliers; Phi-3's attention factor, 4e-5 here where Phi's own fp32 logits are 3e-5 from fp64)
LOOSE = {"mistral": 0.0, "granite": 1e-5, "phi3": 1e-4}
OWN_CLASS = {"mistral": "MistralForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM"}


def published_tiny(config, folder, tokenizer_dir):
    """The tiny model of `config` (a published layout) saved in `folder`; (folder, the family's own model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in config.items()
                                                                      if k not in ("torch_dtype", "architectures")}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name or "qkv_proj" in name:
                p.normal_(0, 0.25)          # sharp attention, as in a trained model
    folder = save_with_tokenizer(model.eval(), folder, tokenizer_dir)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["mistral", "granite", "phi3"])
def family(request, tmp_path_factory, tokenizer_dir):
    """{"name", "dense": the folder, "model": the family's own model, "lfuc": convert's defaults (--no-heal)}.
    The cached view is removed afterwards."""
    import shutil

    from d2m_export.architectures import ARCHITECTURES
    from d2m_export.sources.views import view_path

    root = tmp_path_factory.mktemp(request.param)
    # a neutral folder name: llama.cpp looks Phi's `<|end|>` token up in a file whose general.name (the folder's)
    # names Phi, and the test tokenizer has none
    dense, model = published_tiny(PUBLISHED[request.param], root / "published-tiny", tokenizer_dir)
    (root / "plan.yaml").write_text("blocks:\n  - {host: 1, donors: [2]}\n")
    (root / "empty.yaml").write_text("blocks: []\n")
    assert main(["convert", "--model", str(dense), "--no-heal", "--out", str(root / "lfuc")]) == 0
    yield {"name": request.param, "dense": dense, "model": model, "root": root, "lfuc": root / "lfuc"}
    shutil.rmtree(view_path(dense, ARCHITECTURES[request.param]), ignore_errors=True)


IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def loaded(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_read_as_llama_exactly(family):
    from d2m_export.sources.models import resolve_model

    published = PUBLISHED[family["name"]]
    assert type(family["model"]).__name__ == OWN_CLASS[family["name"]]
    view = resolve_model(family["dense"])
    llama = loaded(view)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.config.head_dim == published.get("head_dim", published["hidden_size"] // 4)
    assert llama.config.tie_word_embeddings == PUBLISHED[family["name"]]["tie_word_embeddings"]
    torch.testing.assert_close(logits(llama), logits(family["model"]), rtol=LOOSE[family["name"]], atol=LOOSE[family["name"]])
    if family["name"] == "mistral":      # nothing folded: the view links to the stored weights
        assert (view / "model.safetensors").is_symlink()
    cfg = config(family["lfuc"])
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_hidden_layers"] < 4


def test_phi4_mini_view_holds_longrope_past_its_original_context(capsys, tmp_path, tokenizer_dir):
    """Past position 4096 transformers switches Phi-4-mini to its long factors, and the view follows (exact at
    position 5000 as at 0). The table targets hold 4096 positions (their default): a --max-seq-len past them is
    refused in one line naming the target, the RoPE type and the limit, with nothing written."""
    import shutil

    from d2m_export.architectures import ARCHITECTURES, table_positions
    from d2m_export.sources.models import resolve_model
    from d2m_export.sources.views import view_path

    dense, phi = published_tiny(PUBLISHED["phi3"], tmp_path / "published-tiny", tokenizer_dir)
    try:
        llama = loaded(resolve_model(dense))
        assert table_positions(llama.config) == 4096 and llama.config.max_position_embeddings == 131072
        for start in (0, 5000):
            pos = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1) + start
            with torch.no_grad():
                want, got = (m(input_ids=IDS, position_ids=pos, use_cache=False).logits for m in (phi, llama))
            torch.testing.assert_close(got, want, rtol=LOOSE["phi3"], atol=LOOSE["phi3"])
        for target in ("onnx", "executorch", "coreml"):
            code, _, err = run_cli(capsys, "--target", target, "--model", dense, "--max-seq-len", 5000,
                                   "--out", tmp_path / target)
            assert_user_error(code, err, f"--max-seq-len 5000 is beyond what the {target} target holds exactly",
                              "'longrope'", "4096 positions")
            assert not (tmp_path / target).exists()
    finally:
        shutil.rmtree(view_path(dense, ARCHITECTURES["phi3"]), ignore_errors=True)


def test_empty_plan_lfuc_and_prune_are_exact(family, tmp_path):
    """Through the command line: LF-UC at an empty plan is the family's own model; LF-UC with a zero router
    over every expert is the dense model with the donor's attention removed and its MLP added to the host's
    (test_surgery's reference, built on the family's own model); prune is it with the donor deleted."""
    import copy

    from test_surgery import fused_reference

    from d2m_export.plan import Block

    model, root, tol = family["model"], family["root"], LOOSE[family["name"]]
    runs = {"empty": ["--plan", root / "empty.yaml"],
            "lfuc": ["--plan", root / "plan.yaml", "--router-init", "zero", "--top-k", 2, "--num-experts", 2],
            "prune": ["--method", "prune", "--plan", root / "plan.yaml"]}
    for name, flags in runs.items():
        assert main([str(a) for a in ["convert", "--model", family["dense"], *flags, "--no-heal", "--calib-tokens",
                                      256, "--out", tmp_path / name]]) == 0
    empty = loaded(tmp_path / "empty")
    assert type(empty).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(logits(empty), logits(model), rtol=tol, atol=tol)
    torch.testing.assert_close(logits(loaded(tmp_path / "lfuc")), logits(fused_reference(model, [Block(1, [2])])),
                               rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    reference = copy.deepcopy(model)
    del reference.model.layers[2]
    pruned = loaded(tmp_path / "prune")
    assert type(pruned).__name__ == "LlamaForCausalLM" and pruned.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=tol, atol=tol)


FAMILY_TARGETS = [("onnx", "dense"), ("onnx", "lfuc"), ("gguf", "dense"), ("gguf", "lfuc"), ("executorch", "lfuc"),
                  ("coreml", "lfuc")]


def export_with_fp32_parity(capsys, model_dir, target, out) -> dict:
    """Export `model_dir` to `target` at fp32 through the command line; its parity record, asserted exact: every
    greedy token of 64 and logits within 1e-4, in each runtime (ONNX also in onnxruntime-genai)."""
    pytest.importorskip({"onnx": "onnxruntime", "gguf": "llama_cpp", "executorch": "executorch",
                         "coreml": "coremltools"}[target])
    flags = ["--max-seq-len", 128] if target in ("executorch", "coreml") else []
    code, _, err = run_cli(capsys, "--target", target, "--model", model_dir, *flags, "--threads", 2, "--out", out)
    assert code == 0, err
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] >= 64 and parity["max_abs_logit_err"] < 1e-4
    for other in (parity.get("other_runtimes") or {}).values():
        assert other["greedy_match"] == other["greedy_total"] and other["max_abs_logit_err"] < 1e-4
    if target == "onnx":
        assert "onnxruntime-genai" in parity["other_runtimes"]
    return parity


def analyze_eval_train(capsys, dense, tmp_path, model_type: str) -> None:
    """analyze, eval and train take `dense` through the command line; training keeps its family."""
    from conftest import write_tiny_corpus

    code, _, err = run_cli(capsys, "analyze", "--model", dense, "--calib-tokens", 256, "--out", tmp_path / "an")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--model", dense, "--tasks", "piqa", "--limit", 2, "--ppl-tokens", 512,
                           "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["value"] > 1
    code, _, err = run_cli(capsys, "train", "--model", dense, "--corpus", write_tiny_corpus(tmp_path / "c.txt"),
                           "--tokens", 256, "--seq-len", 32, "--global-batch", 4, "--micro-batch", 2,
                           "--out", tmp_path / "trained")
    assert code == 0, err
    assert config(tmp_path / "trained")["model_type"] == model_type


@pytest.mark.parametrize("target, model", FAMILY_TARGETS, ids=[f"{t}-{m}" for t, m in FAMILY_TARGETS])
def test_family_exports_match_transformers(capsys, family, tmp_path, target, model):
    """fp32 parity in each runtime (ONNX also in onnxruntime-genai; Core ML as its lowered module in
    PyTorch, as on Linux), for the dense model given in its own family's layout and its LF-UC conversion."""
    parity = export_with_fp32_parity(capsys, family[model], target, tmp_path / "x")
    if target == "coreml":
        assert parity["checked_on"] == "pytorch-lowered-module" and parity["free_running_greedy_identical"]


def test_analyze_upcycle_heal_eval_train(capsys, family, tmp_path):
    from conftest import write_tiny_corpus

    dense = family["dense"]
    code, _, err = run_cli(capsys, "analyze", "--model", dense, "--calib-tokens", 256, "--out", tmp_path / "an")
    assert code == 0, err
    code, _, err = run_cli(capsys, "convert", "--model", dense, "--method", "upcycle", "--num-experts", 2,
                           "--router-init", "zero", "--no-heal", "--out", tmp_path / "up")
    assert code == 0, err
    tol = max(LOOSE[family["name"]], 1e-5)
    torch.testing.assert_close(logits(loaded(tmp_path / "up")), logits(family["model"]), rtol=tol, atol=tol)
    code, out, err = run_cli(capsys, "heal", "--model", family["lfuc"], "--calib-tokens", 512, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "healed" in out, err
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "healed", "--tasks", "piqa", "--limit", 2,
                           "--ppl-tokens", 512, "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["value"] > 1
    code, _, err = run_cli(capsys, "train", "--model", dense, "--corpus", write_tiny_corpus(tmp_path / "corpus.txt"),
                           "--tokens", 256, "--seq-len", 32, "--global-batch", 4, "--micro-batch", 2,
                           "--out", tmp_path / "trained")
    assert code == 0, err
    assert config(tmp_path / "trained")["model_type"] == "llama"


def test_a_sliding_window_shorter_than_the_positions_is_refused(capsys, tmp_path, tokenizer_dir):
    """Mistral 7B v0.1's window (4096 of 32768 positions) no target holds; Ministral's (all positions) reads as
    Llama. Refused before anything is written, in one line naming the window and the targets."""
    from d2m_export.architectures import ARCHITECTURES
    from d2m_export.sources.models import resolve_model
    from d2m_export.sources.views import view_path

    windowed, _ = published_tiny({**PUBLISHED["mistral"], "sliding_window": 4096}, tmp_path / "v01", tokenizer_dir)
    ministral, _ = published_tiny({**PUBLISHED["mistral"], "sliding_window": 32768}, tmp_path / "ministral",
                                  tokenizer_dir)
    for argv in (["convert"], ["analyze"], ["--target", "onnx"], ["--target", "gguf"]):
        code, _, err = run_cli(capsys, *argv, "--model", windowed, "--out", tmp_path / "out")
        assert_user_error(code, err, "sliding_window 4096 < max_position_embeddings 32768", "onnx, gguf")
        assert not (tmp_path / "out").exists()
    view = resolve_model(ministral)
    try:
        assert config(view)["model_type"] == "llama" and "sliding_window" not in config(view)
    finally:
        import shutil
        shutil.rmtree(view_path(ministral, ARCHITECTURES["mistral"]))


@pytest.fixture(scope="module")
def unread_families(tmp_path_factory):
    """A tiny GPT-2 and a tiny Mamba, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    root = tmp_path_factory.mktemp("unread")
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2)).save_pretrained(root / "gpt2")
    MambaForCausalLM(MambaConfig(vocab_size=1000, hidden_size=32, state_size=4, num_hidden_layers=2)) \
        .save_pretrained(root / "mamba")
    return root


@pytest.mark.parametrize("model_type", ["gpt2", "mamba"])
@pytest.mark.parametrize("argv", [["analyze"], ["convert"], ["--target", "onnx"]], ids=["analyze", "convert", "onnx"])
def test_a_family_we_do_not_read_is_refused_naming_those_we_do(capsys, unread_families, tmp_path, model_type, argv):
    code, _, err = run_cli(capsys, *argv, "--model", unread_families / model_type, "--out", tmp_path / "out")
    assert_user_error(code, err, f"unsupported architecture {model_type!r}", "granite", "llama", "mistral", "qwen2",
                      "qwen3", "gemma3_text")
    assert not (tmp_path / "out").exists()
