"""MoE → dense from today's MoE families: OLMoE, Granite-MoE (plain and shared), DeepSeek-V2/V3.

Each tiny random model keeps every expert under a constant router, so every token weighs each
expert equally and concatenation must give the MoE's logits back; the dense model is the family
each module in d2m_export.architectures names, loaded again with plain AutoModelForCausalLM."""
from __future__ import annotations

import json

import pytest
import torch

from d2m_export.methods import moe2dense
from d2m_export.sources.params import param_counts

from test_moe2dense import logits

VOCAB = 512
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(kind: str, experts: int = 4, top_k: int | None = None, tied: bool = False, vocab: int = VOCAB):
    import transformers as tf

    torch.manual_seed(0)
    COMMON = {**globals()["COMMON"], "vocab_size": vocab}
    k = top_k or experts
    if kind == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=experts,
                                                   num_experts_per_tok=k, tie_word_embeddings=tied))
    elif kind in ("granitemoe", "granitemoeshared"):
        granite = dict(**COMMON, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=k,
                       tie_word_embeddings=tied, embedding_multiplier=12.0, attention_multiplier=0.05,
                       residual_multiplier=0.22, logits_scaling=6.0)
        if kind == "granitemoe":
            model = tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(**granite))
        else:
            model = tf.GraniteMoeSharedForCausalLM(tf.GraniteMoeSharedConfig(**granite, shared_intermediate_size=40))
    else:       # DeepSeek: MLA, one leading dense layer, two shared experts, routed scaling
        mla = dict(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=experts,
                   num_experts_per_tok=k, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                   n_group=1, topk_group=1, tie_word_embeddings=tied)
        if kind == "deepseek_v2":
            model = tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(**mla, topk_method="greedy"))
        else:
            model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**mla, norm_topk_prob=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "shared" in name:
                p.normal_(0, 0.2)
            elif "self_attn" in name and p.dim() == 2:     # sharp attention: folds of its scale show
                p.normal_(0, 0.3)
    return model.eval()


def constant_routing(model):
    with torch.no_grad():
        for i in moe2dense.moe_layers(model):
            arch = moe2dense._family(model)
            arch.router(arch.moe_block(model.model.layers[i])).weight.zero_()


FAMILIES = {"olmoe": "OlmoeForCausalLM", "granitemoe": "LlamaForCausalLM", "granitemoeshared": "LlamaForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_expert_kept_under_a_constant_router_is_exact(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    moe = tiny(kind, tied=kind == "granitemoeshared")
    constant_routing(moe)
    stats = moe2dense.routing_stats(moe, torch.randint(0, VOCAB, (4, 16)), progress=False)
    assert sorted(stats) == ([1, 2] if kind.startswith("deepseek") else [0, 1, 2])
    dense, record = moe2dense.convert(moe, stats, kept=4, groups=4, score="acp")
    assert type(dense).__name__ == FAMILIES[kind]
    assert not moe2dense.moe_layers(dense) or kind == "olmoe"     # OLMoE's one expert per layer is dense
    torch.testing.assert_close(logits(dense, IDS), logits(moe, IDS), rtol=1e-4, atol=1e-4)
    dense.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again.eval(), IDS), logits(moe, IDS), rtol=1e-4, atol=1e-4)
    if kind.startswith("deepseek"):     # the leading dense layer (40 wide) is padded to 2 shared + 4 routed × 24
        assert record[0]["zero_padding"] == 48 + 4 * 24 - 40 and "zero_padding" not in record[1]
    counts = param_counts(dense.config)
    stored = sum(p.numel() for p in dense.parameters())
    assert counts.total == stored and counts.active == stored - (0 if dense.config.tie_word_embeddings
                                                                 else (VOCAB - 1) * 32)


@pytest.mark.parametrize("kind", FAMILIES)
def test_routed_weights_and_scores_follow_each_router(kind):
    """Top-2 of 4 under each family's own router: the selected weights (with DeepSeek's scaling
    factor) are what cp reads, pp sums to 1 for softmax routers, and K = 1 writes one expert's width."""
    moe = tiny(kind, top_k=2)
    stats = moe2dense.routing_stats(moe, torch.randint(0, VOCAB, (4, 16)), progress=False)
    st = stats[max(stats)]
    assert float(st.selected.sum()) == 2 * st.tokens
    per_token = float(st.weight_sum.sum()) / st.tokens
    expected = {"deepseek_v3": 2.5, "deepseek_v2": None, "olmoe": None}.get(kind, 1.0)
    if expected is not None:
        assert abs(per_token - expected) < 1e-4, per_token
    pp = st.scores()["pp"]
    if kind == "deepseek_v3":       # sigmoid scores, each near 0.5 for a small random router
        assert 1.5 < float(pp.sum()) < 2.5
    else:
        assert abs(float(pp.sum()) - 1) < 1e-5
    dense, _ = moe2dense.convert(moe, stats, kept=1, groups=1, score="pp", scaling="uniform")
    shared = {"granitemoeshared": 40, "deepseek_v2": 48, "deepseek_v3": 48}.get(kind, 0)
    assert dense.config.intermediate_size == max(shared + 24, 40 if kind.startswith("deepseek") else 0)


def test_moe_params_count_each_tokens_experts():
    moe = tiny("deepseek_v3", top_k=2)
    counts = param_counts(moe.config)
    stored = sum(p.numel() for p in moe.parameters())
    expert = 3 * 32 * 24
    assert counts.total == stored
    assert counts.active == stored - (VOCAB - 1) * 32 - 2 * 2 * expert     # 2 MoE layers, 2 of 4 experts unused


@pytest.mark.parametrize("kind", FAMILIES)
def test_cli_converts_each_family_and_says_where_it_exports(kind, tmp_path, tokenizer_dir, capsys):
    """Through the CLI with a real tokenizer; Granite's Llama exports to ONNX and matches in ONNX
    Runtime; the families no exporter takes (OLMoE's full-width q/k norms, DeepSeek's MLA) are
    refused by the exporter in one line, exit 2, nothing written."""
    from conftest import export_with_cli, run_cli, save_with_tokenizer

    save_with_tokenizer(tiny(kind, top_k=2, vocab=49152), tmp_path / "moe", tokenizer_dir)
    capsys.readouterr()
    code, out, err = run_cli(capsys, "convert", "--method", "moe2dense", "--model", tmp_path / "moe",
                             "--experts-kept", 2, "--groups", 1, "--grouping", "kmeans", "--scaling", "uniform",
                             "--calib-tokens", 256, "--out", tmp_path / "dense")
    assert code == 0, err
    assert f"wrote {FAMILIES[kind]}" in out
    record = json.loads((tmp_path / "dense" / "d2m_plan.json").read_text())
    assert record["params"]["active"] < record["params"]["moe_total"]
    if FAMILIES[kind] == "LlamaForCausalLM":
        manifest = export_with_cli(capsys, "onnx", tmp_path / "dense", tmp_path / "onnx")
        assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"], manifest["parity"]
    else:
        code, _, err = run_cli(capsys, "--target", "onnx", "--model", tmp_path / "dense", "--out", tmp_path / "onnx")
        assert code == 2 and len(err.strip().splitlines()) == 1 and kind.split("_")[0] in err.lower(), err
        assert not (tmp_path / "onnx").exists()


def test_a_family_we_cannot_read_is_refused(tmp_path, tokenizer_dir, capsys):
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from conftest import run_cli, save_with_tokenizer

    save_with_tokenizer(PhimoeForCausalLM(PhimoeConfig(**COMMON, intermediate_size=24, num_local_experts=4)),
                        tmp_path / "moe", tokenizer_dir)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "convert", "--method", "moe2dense", "--model", tmp_path / "moe",
                           "--experts-kept", 1, "--out", tmp_path / "dense")
    assert code == 2 and "phimoe" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "dense").exists()
