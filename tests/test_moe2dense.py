"""MoE → dense: the concatenation identity, scoring and selection, and bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_dense
from d2m_export.methods import moe2dense
from d2m_export.cli import main
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def tiny_moe(kind: str, experts: int = 4, top_k: int | None = None):
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  num_experts_per_tok=top_k or experts)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=24, num_local_experts=experts))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=40, moe_intermediate_size=24,
                                                   num_experts=experts, norm_topk_prob=True, mlp_only_layers=[1]))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=40, num_experts=experts,
                                                   norm_topk_prob=True, mlp_only_layers=[1]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)
    return model.eval()


def constant_router(model):
    with torch.no_grad():
        for i in moe2dense.moe_layers(model):
            model.model.layers[i].mlp.gate.weight.zero_()
            if hasattr(model.model.layers[i].mlp, "shared_expert_gate"):
                model.model.layers[i].mlp.shared_expert_gate.weight.zero_()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_all_experts_kept_with_constant_router_is_exact(kind):
    moe = tiny_moe(kind)
    constant_router(moe)
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (4, 16)), progress=False)
    dense, record = moe2dense.convert(moe, stats, kept=4, groups=4, score="acp")
    assert type(dense).__name__ == {"mixtral": "LlamaForCausalLM", "qwen2_moe": "Qwen2ForCausalLM",
                                    "qwen3_moe": "Qwen3ForCausalLM"}[kind]
    torch.testing.assert_close(logits(dense), logits(moe), rtol=1e-5, atol=1e-5)
    if kind == "qwen2_moe":   # the dense layer is padded to the concatenated width, exactly
        assert record[1]["zero_padding"] == 40 + 4 * 24 - 40


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lfuc_round_trip_is_exact_with_all_donors_selected(family):
    """Qwen3: the shared host is folded into each expert, and concatenation still gives it back."""
    dense = tiny_dense(family)
    fused = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(1, [2, 3])],
                                                 Options(host_mode="shared", router_init="zero", top_k=2)))
    stats = moe2dense.routing_stats(fused, torch.randint(0, 49152, (2, 16)), progress=False)
    back, _ = moe2dense.convert(fused, stats, kept=2, groups=2, score="sf")
    assert type(back) is type(dense) and back.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(back), logits(fused), rtol=1e-5, atol=1e-5)


def test_scores_rank_a_dead_expert_last():
    moe = tiny_moe("mixtral", experts=4, top_k=2)
    with torch.no_grad():
        for i in moe2dense.moe_layers(moe):
            moe.model.layers[i].mlp.experts.down_proj[2].zero_()        # expert 2 outputs nothing
            moe.model.layers[i].mlp.gate.weight[2].fill_(0)
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (4, 16)), progress=False)
    for score in ("acp", "do-acp"):
        kept, _ = moe2dense.select(stats[0], score, 3)
        assert 2 not in kept, score
    pp = stats[0].scores()["pp"]          # a mean of probability vectors
    assert torch.all(pp > 0) and abs(float(pp.sum()) - 1) < 1e-5
    merged, record = moe2dense.convert(moe, stats, kept=3, groups=2, score="do-acp")
    assert merged.config.intermediate_size == 2 * 24
    assert sorted(len(g) for g in record[0]["groups"]) == [1, 2]


def expert_outputs(block, x):
    gate_up, down, act = moe2dense._experts(block)
    outs = []
    for e in range(gate_up.shape[0]):
        g, u = (x @ gate_up[e].T).chunk(2, dim=-1)
        outs.append((act(g) * u) @ down[e].T)
    return torch.stack(outs)                      # [E, T, H]


@pytest.mark.parametrize("grouping", ["score", "frequency", "kmeans"])
def test_uniform_scaling_with_every_expert_kept_is_their_mean(grouping):
    """K = k = E with 1/k scaling: each dense MLP is exactly the mean of the layer's experts (grouping
    does nothing when every group has one member)."""
    moe = tiny_moe("mixtral", experts=4, top_k=2)
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (2, 16)), progress=False)
    dense, _ = moe2dense.convert(moe, stats, kept=4, groups=4, score="pp", grouping=grouping, scaling="uniform")
    x = torch.randn(5, 32)
    for i in moe2dense.moe_layers(moe):
        with torch.no_grad():
            torch.testing.assert_close(dense.model.layers[i].mlp(x), expert_outputs(moe.model.layers[i].mlp, x).mean(0),
                                       rtol=1e-5, atol=1e-6)


def test_groupings_merge_as_they_say():
    """kmeans: a plain mean of its members' weights; frequency: weighted by selection frequency."""
    moe = tiny_moe("mixtral", experts=4, top_k=2)
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (2, 16)), progress=False)
    gate_up, down, _ = moe2dense._experts(moe.model.layers[0].mlp)
    for grouping in ("kmeans", "frequency"):
        dense, record = moe2dense.convert(moe, stats, kept=3, groups=1, score="acp", grouping=grouping,
                                          scaling="uniform")
        members = record[0]["groups"][0]
        assert sorted(members) == sorted(record[0]["kept"])
        sf = stats[0].scores()["sf"][members]
        w = torch.full((3,), 1 / 3) if grouping == "kmeans" else sf / sf.sum()
        expected = sum(wi * gate_up[e][:24] for wi, e in zip(w, members))
        torch.testing.assert_close(dense.model.layers[0].mlp.gate_proj.weight, expected)


def test_kmeans_puts_near_copies_together():
    """Two experts that are near copies of each other end in one group, the third apart."""
    moe = tiny_moe("mixtral", experts=3, top_k=2)
    with torch.no_grad():
        e = moe.model.layers[0].mlp.experts
        e.gate_up_proj[1].copy_(e.gate_up_proj[0] + 1e-3 * torch.randn_like(e.gate_up_proj[0]))
        e.down_proj[1].copy_(e.down_proj[0])
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (2, 16)), progress=False)
    _, record = moe2dense.convert(moe, stats, kept=3, groups=2, score="random", grouping="kmeans")
    assert sorted(sorted(g) for g in record[0]["groups"]) in ([[0, 1], [2]], [[2], [0, 1]])


def test_random_score_is_a_seeded_control():
    moe = tiny_moe("mixtral", experts=4, top_k=2)
    stats = moe2dense.routing_stats(moe, torch.randint(0, 49152, (2, 16)), progress=False)
    a, _ = moe2dense.select(stats[0], "random", 4, seed=0)
    assert sorted(a) == [0, 1, 2, 3] and moe2dense.select(stats[0], "random", 4, seed=0)[0] == a
    assert any(moe2dense.select(stats[0], "random", 4, seed=s)[0] != a for s in range(1, 6))


@pytest.fixture
def moe_dir(tmp_path, tokenizer_dir):
    out = tmp_path / "moe"
    tiny_moe("qwen2_moe").save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_cli_writes_dense_checkpoint_with_scores(moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    assert main(["convert", "--method", "moe2dense", "--model", str(moe_dir), "--experts-kept", "2",
                 "--score", "do-acp", "--calib-tokens", "256", "--out", str(out)]) == 0
    record = json.loads((out / "d2m_plan.json").read_text())
    assert record["plan"] == {"experts_kept": 2, "groups": 2, "score": "do-acp", "grouping": "score",
                              "scaling": "score", "calibration_tokens": 256}
    # layer 1 was dense (40 wide) and is padded to the shared 40 + 2 × 24 neurons of the merged layers
    assert record["params"]["zero_padding"] == 3 * 32 * (40 + 2 * 24 - 40)
    assert set(record["layers"]["0"]["scores"]) == {"sf", "cp", "acp", "pp"}
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize("argv, needle", [
    (["--experts-kept", "9"], "between 1 and the 4 experts"),
    (["--experts-kept", "2", "--groups", "3"], "--groups 3"),
    (["--experts-kept", "2", "--score", "magic"], "--score"),
    (["--experts-kept", "2", "--grouping", "magic"], "--grouping must be one of score, frequency, kmeans"),
    (["--experts-kept", "2", "--scaling", "magic"], "--scaling must be one of score, uniform"),
])
def test_bad_input(capsys, moe_dir, tmp_path, argv, needle):
    code = main(["convert", "--method", "moe2dense", "--model", str(moe_dir), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_dense_model_is_refused(capsys, tiny_model_dir, tmp_path):
    code = main(["convert", "--method", "moe2dense", "--model", str(tiny_model_dir), "--experts-kept", "1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no MoE layers" in err, err


def test_round_trip_lfuc_cpt_moe2dense_exports_to_every_target(tmp_path, tokenizer_dir, capsys):
    """dense → LF-UC → CPT → moe2dense → every target; each export passes its own parity check."""
    from conftest import export_with_cli, run_cli, save_with_tokenizer

    fused = get_method("lfuc").build(tiny_dense("llama"), Plan("lfuc", 6, [Block(1, [2, 3])],
                                                               Options(host_mode="shared", router_init="zero", top_k=1)))
    save_with_tokenizer(fused, tmp_path / "moe", tokenizer_dir)
    code, _, err = run_cli(capsys, "train", "--model", tmp_path / "moe", "--out", tmp_path / "cpt", "--tokens", 1024,
                           "--seq-len", 64, "--micro-batch", 4, "--global-batch", 4, "--lr", "1e-3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "convert", "--method", "moe2dense", "--model", tmp_path / "cpt",
                           "--experts-kept", 1, "--calib-tokens", 256, "--out", tmp_path / "dense")
    assert code == 0, err
    for target in ("onnx", "gguf", "executorch"):     # fp32 by default: every greedy token must match
        manifest = export_with_cli(capsys, target, tmp_path / "dense", tmp_path / target)
        assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"], (target, manifest["parity"])
    # The ONNX graph leaves out the zero neurons moe2dense padded the unfused layers with.
    import onnx

    record = json.loads((tmp_path / "dense" / "d2m_plan.json").read_text())
    padded = [int(i) for i, v in record["layers"].items() if v.get("zero_padding")]
    assert padded
    shapes = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "onnx" / "model.onnx"),
                                                       load_external_data=False).graph.initializer}
    merged_width = json.loads((tmp_path / "dense" / "config.json").read_text())["intermediate_size"]   # 48 + 48
    for i in padded:      # 48 live neurons, kept to a multiple of 32 for the block quantizers
        down = [d for n, d in shapes.items() if n.startswith(f"layers.{i}.mlp.down")]
        assert down and sorted(down[0]) == [32, 64] and merged_width == 96, (i, shapes.keys())
    export_with_cli(capsys, "coreml", tmp_path / "dense", tmp_path / "coreml")   # fp16; its own gate passed
