"""GGUF export run in stock llama.cpp (llama-cpp-python), checked against transformers independently.

Tiny random models: a dense Llama, Qwen2 and Qwen3, and LF-UC conversions of the Llama (Qwen2-MoE;
shared and routed host, top-1 and top-2), of the Qwen2 (q/k/v biases) and of the Qwen3 (Qwen3-MoE:
q/k norms, no shared expert), whose routers are made random so that routing matters.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import export_with_cli, run_cli, save_with_tokenizer, tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

BLOCKS = [Block(1, [2, 3]), Block(4, [5])]      # 6 layers -> 3: dense, MoE, MoE
VARIANTS = ["llama", "qwen2", "qwen3", "lfuc-shared-k1", "lfuc-shared-k2", "lfuc-routed-k1", "lfuc-routed-k2",
            "lfuc-shared-k2-qwen2", "lfuc-routed-k1-qwen2", "lfuc-shared-k2-qwen3", "lfuc-routed-k1-qwen3"]
DENSE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_arch(variant: str) -> str:
    """Dense models keep their family; LF-UC of Qwen3 is hy_v3, of Llama/Qwen2 step35 (see converters/gguf.py)."""
    return DENSE.get(variant) or ("hy_v3" if variant.endswith("qwen3") else "step35")


def build(variant: str):
    if variant in DENSE:
        return tiny_dense(variant)
    _, mode, k, *base = variant.split("-")
    top_k = int(k[1])
    plan = Plan("lfuc", 6, BLOCKS, Options(host_mode=mode, top_k=top_k, num_experts=3, router_init="zero"))
    moe = get_method("lfuc").build(tiny_dense(*base or ["llama"]), plan)
    g = torch.Generator().manual_seed(top_k)
    with torch.no_grad():       # a random router: different tokens take different experts
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g))
    return moe


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf-models")
    dirs = {}
    for variant in VARIANTS:
        dirs[variant] = save_with_tokenizer(build(variant), root / variant, tokenizer_dir)
    return dirs


run = run_cli


def export(capsys, model_dir, out, quant=None):
    return export_with_cli(capsys, "gguf", model_dir, out, quant)


def hf_greedy(model_dir, prompt_ids, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_matches_transformers_greedy(capsys, models, tmp_path, variant):
    from runtimes.base import load_runner

    out = tmp_path / "export"
    manifest = export(capsys, models[variant], out)
    assert {"target", "files", "base_model", "plan", "quant", "context_length", "tokenizer", "parity"} <= manifest.keys()
    assert manifest["target"] == "gguf" and manifest["quant"] == "f32" and manifest["context_length"] == 256
    assert "tokenizer.json" in manifest["tokenizer"] and (out / "tokenizer.json").is_file()
    parity = manifest["parity"]
    assert parity["greedy_total"] >= 32 and parity["greedy_match"] == parity["greedy_total"]
    assert parity["max_abs_logit_err"] < 1e-4

    reader = gguf.GGUFReader(out / manifest["files"][0])
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    assert arch == gguf_arch(variant)
    # tied: stored once, except by step35, which has no fallback from the LM head to the token embedding
    assert ("output.weight" in names) == (arch == "step35") == manifest["gguf"]["output_copies_embedding"]
    if arch in ("step35", "hy_v3"):    # layer 0 dense, layers 1-2 MoE (router + experts + a shared expert)
        assert "blk.0.ffn_gate.weight" in names and "blk.0.ffn_gate_inp.weight" not in names
        assert {"blk.1.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_shexp.weight"} <= names
        # Qwen3-MoE has no shared expert: its shared host is folded into the experts (48 + 48 wide)
        folded = variant.endswith("qwen3") and "shared" in variant
        assert reader.fields[f"{arch}.expert_shared_feed_forward_length"].contents() == (
            48 if "shared" in variant and not folded else 1)
        assert reader.fields[f"{arch}.expert_feed_forward_length"].contents() == (96 if folded else 48)
        # from Qwen2: q/k/v biases (random, std 0.1: leaving them out moves logits far beyond the 1e-4 above)
        assert ({"blk.0.attn_q.bias", "blk.2.attn_k.bias", "blk.2.attn_v.bias"} <= names) == variant.endswith("qwen2")
    assert ({"blk.0.attn_q_norm.weight", "blk.2.attn_k_norm.weight"} <= names) == variant.endswith("qwen3")

    # Independently of the exporter's own check: free-running greedy decoding in llama.cpp
    # reproduces transformers' generate() token for token.
    prompt = [504, 3459, 8089, 12480, 690, 260, 23790, 2767, 30]
    with load_runner(out, threads=2, kv_type="f32") as runner:
        got = runner.generate(prompt, 40)
    assert got == hf_greedy(models[variant], prompt, 40)


@pytest.mark.parametrize("variant", ["llama", "lfuc-shared-k2", "lfuc-routed-k1"])
def test_q8_0_runs_and_mostly_agrees(capsys, models, tmp_path, variant):
    manifest = export(capsys, models[variant], tmp_path / "q8", quant="q8_0")
    parity = manifest["parity"]
    assert parity["greedy_match"] >= 0.75 * parity["greedy_total"] and 0 < parity["max_abs_logit_err"] < 0.1
    details = manifest["gguf"]
    assert details["tensor_types"].get("Q8_0", 0) > 0 and details["tensor_types"]["F32"] > 0
    # the tiny MLP width (48) is no multiple of 32: those rows fall back to f16, and that is recorded
    fallbacks = {f["tensor"]: f for f in details["quant_fallbacks"]}
    assert fallbacks["blk.0.ffn_down.weight"]["type"] == "F16" and "48" in fallbacks["blk.0.ffn_down.weight"]["why"]
    tensors = gguf.GGUFReader(tmp_path / "q8" / manifest["files"][0]).tensors
    assert sum(int(t.n_bytes) for t in tensors) < 0.3 * 4 * sum(int(t.n_elements) for t in tensors)


def test_q4_0_keeps_the_head_at_q8_0(capsys, models, tmp_path):
    manifest = export(capsys, models["llama"], tmp_path / "q4", quant="q4_0")
    parity = manifest["parity"]
    assert parity["greedy_match"] >= 0.5 * parity["greedy_total"]
    reader = gguf.GGUFReader(tmp_path / "q4" / manifest["files"][0])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"   # tied: the head


@pytest.mark.parametrize("quant", ["f16", "q4_0"])
def test_lfuc_of_a_tied_qwen3_is_no_larger_than_dense(models, tmp_path, quant):
    """hy_v3 stores the tied embedding once, as the dense export does, so LF-UC, which drops attention
    layers, writes the smaller file (step35's second copy of the 49152-row embedding would make it the
    larger). Structural: the files only, their parity is checked above."""
    from converters.gguf import GGUFExporter

    sizes = {}
    for variant in ("qwen3", "lfuc-routed-k1-qwen3"):
        (tmp_path / variant).mkdir()
        files = GGUFExporter().export(models[variant], quant, tmp_path / variant)
        sizes[variant] = (tmp_path / variant / files[0]).stat().st_size
    assert sizes["lfuc-routed-k1-qwen3"] <= sizes["qwen3"], sizes


def test_tokenizer_metadata_matches_llama_cpp_converter(capsys, models, tmp_path):
    """Against the packaged SmolLM2 GGUF, which llama.cpp's own converter wrote from the same vocabulary."""
    import importlib.util
    from pathlib import Path

    from d2m_export.sources.models import EMBEDDED

    manifest = export(capsys, models["llama"], tmp_path / "e")
    ours = gguf.GGUFReader(tmp_path / "e" / manifest["files"][0]).fields
    package, filename = EMBEDDED["smollm2-135m"]
    ref = gguf.GGUFReader(Path(list(importlib.util.find_spec(package).submodule_search_locations)[0]) / filename).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key].contents() == ref[key].contents(), key


def test_llama_cpp_tokenizes_like_transformers(capsys, models, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    manifest = export(capsys, models["qwen2"], tmp_path / "t")
    llm = Llama(str(tmp_path / "t" / manifest["files"][0]), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(models["qwen2"])
    for text in ("Hello world, this is a test.", "  Indented\n\tlines: don't, won't; naïve café!",
                 "<|im_start|>user\nHi there<|im_end|>"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text)["input_ids"], text


def test_embedded_lineage_takes_the_original_pre_tokenizer(tmp_path):
    from converters.gguf_vocab import embedded_origin, pre_tokenizer

    (tmp_path / "d2m_plan.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert embedded_origin(tmp_path) is not None
    assert pre_tokenizer(tmp_path, {"pre_tokenizer": {"type": "ByteLevel"}}) == "smollm"
    assert pre_tokenizer(tmp_path / "x", {"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"


@pytest.mark.parametrize("argv, needle", [
    (["--quant", "q3_k"], "--quant 'q3_k'"),
    (["--quant", "q4_k_s"], "choose one of f32, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k"),
    (["--target", "onnx-nope"], "unknown --target"),
])
def test_bad_input_exits_2_and_writes_nothing(capsys, models, tmp_path, argv, needle):
    args = ["--target", "gguf", "--model", models["llama"], "--out", tmp_path / "o", *argv]
    code, _, err = run(capsys, *args)
    assert code == 2 and needle in err and err.count("d2m-export: error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_foreign_output_dir_is_refused(capsys, models, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "--target", "gguf", "--model", models["llama"], "--out", out)
    assert code == 2 and "not written by d2m-export" in err
    assert [p.name for p in tmp_path.iterdir()] == ["theirs"] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_parity_failure_exits_1_and_leaves_nothing(capsys, models, tmp_path, monkeypatch):
    import converters.gguf as exporter

    original = exporter.all_tensors

    def corrupted(state, cfg, arch):        # one attention weight slightly off
        for name, w in original(state, cfg, arch):
            yield name, (w * 1.05 if name == "blk.1.attn_v.weight" else w)

    monkeypatch.setattr(exporter, "all_tensors", corrupted)
    code, _, err = run(capsys, "--target", "gguf", "--model", models["llama"], "--out", tmp_path / "o")
    assert code == 1 and "parity check failed" in err
    assert list(tmp_path.iterdir()) == []


def test_routed_host_needs_the_zero_shared_expert(capsys, models, tmp_path, monkeypatch):
    """step35 adds silu(x) on a MoE layer that has no shared-expert weights: leaving them out must fail."""
    import converters.gguf as exporter

    original = exporter.all_tensors
    monkeypatch.setattr(exporter, "all_tensors",
                        lambda *a: ((n, w) for n, w in original(*a) if "shexp" not in n))
    code, _, err = run(capsys, "--target", "gguf", "--model", models["lfuc-routed-k1"], "--out", tmp_path / "o")
    assert code == 1 and not (tmp_path / "o").exists()


def test_bench_and_generate(capsys, models, tmp_path):
    out = tmp_path / "e"
    export(capsys, models["lfuc-shared-k1"], out)
    code, stdout, err = run(capsys, "bench", out, "--prompt-tokens", 16, "--new-tokens", 8, "--repeats", 1,
                            "--out", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"target", "quant", "threads", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token_p50",
            "peak_rss_mb"} <= result.keys()
    assert result["target"] == "gguf" and result["threads"] == 2 and result["decode_tokens_per_s"] > 0
    code, stdout, err = run(capsys, "generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 8)
    assert code == 0, err
    assert stdout.startswith("Once upon a time") and len(stdout.strip()) > len("Once upon a time")


def test_runner_generate_is_greedy_and_stops():
    from runtimes.base import Runner

    class Scripted(Runner):          # logits that favour token (last + 1) % 5
        def prefill(self, ids):
            self.last = ids[-1]
            return self.decode(None)

        def decode(self, token):
            self.last = self.last if token is None else token
            return np.eye(5)[(self.last + 1) % 5]

    assert Scripted().generate([0], 6) == [1, 2, 3, 4, 0, 1]
    assert Scripted().generate([0], 6, stop_ids=[3]) == [1, 2, 3]


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory, tokenizer_dir):
    """Rows of 256 and 512 values, so that llama.cpp's k-quant blocks (256) fit and no tensor falls back."""
    root = tmp_path_factory.mktemp("gguf-wide")
    wide = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    plan = Plan("lfuc", 6, BLOCKS, Options(host_mode="routed", top_k=1, num_experts=4, router_init="zero"))
    moe = get_method("lfuc").build(tiny_dense("llama", **wide), plan)
    return {"llama": save_with_tokenizer(tiny_dense("llama", **wide), root / "llama", tokenizer_dir),
            "lfuc": save_with_tokenizer(moe, root / "lfuc", tokenizer_dir)}


@pytest.mark.parametrize("quant, file_type, main_type", [("q4_k_m", 15, "Q4_K"), ("q5_k_m", 17, "Q5_K"),
                                                         ("q6_k", 18, "Q6_K")])
@pytest.mark.parametrize("variant", ["llama", "lfuc"])
def test_k_quants_come_from_llama_cpp_quantizer_and_meet_their_floor(capsys, wide_models, tmp_path, quant, file_type,
                                                                    main_type, variant):
    out = tmp_path / "k"
    manifest = export(capsys, wide_models[variant], out, quant=quant)
    assert manifest["files"] == [f"model-{quant}.gguf"] and sorted(p.name for p in out.glob("*.gguf")) == manifest["files"]
    parity = manifest["parity"]
    from converters.gguf import GGUFExporter
    from converters.parity import text_gate_failure

    assert text_gate_failure(parity["text"], GGUFExporter.tolerances[quant]) is None
    assert parity["max_abs_logit_err"] > 0
    reader = gguf.GGUFReader(out / manifest["files"][0])
    assert int(reader.fields["general.file_type"].contents()) == file_type
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert manifest["gguf"]["quantized_by"].startswith("llama.cpp") and manifest["gguf"]["tensor_types"].get(main_type)
    assert types["blk.0.attn_q.weight"] == main_type and types["blk.0.attn_norm.weight"] == "F32"
    if variant == "lfuc":      # experts quantized, the router kept at f32 (as llama.cpp's quantizer does)
        assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.ffn_up_exps.weight"] != "F32"
