"""Exactness of the model surgery: each conversion against an independent reference."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class FusedFFN(torch.nn.Module):
    """Reference for a fused host: its MLP plus every donor MLP, each under its own RMSNorm,
    all fed the host's post-attention residual (the norm is applied here, not before)."""

    def __init__(self, host, donors):
        super().__init__()
        self.pairs = torch.nn.ModuleList(
            torch.nn.ModuleList([layer.post_attention_layernorm, layer.mlp]) for layer in [host, *donors])

    def forward(self, residual):
        return sum(mlp(norm(residual)) for norm, mlp in self.pairs)


def fused_reference(dense, blocks: list[Block]):
    ref = copy.deepcopy(dense)
    layers = ref.model.layers
    for b in blocks:
        host = layers[b.host]
        host.mlp = FusedFFN(host, [layers[d] for d in b.donors])
        host.post_attention_layernorm = torch.nn.Identity()
    for d in sorted((d for b in blocks for d in b.donors), reverse=True):
        del layers[d]
    return ref


FAMILIES = ["llama", "qwen2", "qwen3"]
MOE_CLASS = {"llama": "Qwen2MoeForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("arch", FAMILIES)
def test_empty_plan_reproduces_dense_exactly(arch):
    dense = tiny_dense(arch)
    fused = get_method("lfuc").build(dense, Plan("lfuc", 6, []))
    assert type(fused).__name__ == MOE_CLASS[arch]
    assert torch.equal(logits(fused), logits(dense))


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycle_with_zero_router_is_exact(arch, top_k):
    dense = tiny_dense(arch)
    moe = get_method("upcycle").build(dense, Plan("upcycle", 6, [], Options(top_k=top_k, num_experts=4)))
    assert moe.config.num_experts == 4 and moe.config.mlp_only_layers == []
    torch.testing.assert_close(logits(moe), logits(dense), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("host_mode", ["shared", "routed"])
def test_fused_equals_donor_attention_removed_reference(arch, host_mode):
    """Qwen3-MoE has no shared expert: in shared mode the host MLP is folded into every expert."""
    dense = tiny_dense(arch)
    blocks = [Block(1, [2, 3]), Block(4, [5])]
    experts = 2 if host_mode == "shared" else 3
    plan = Plan("lfuc", 6, blocks, Options(router_init="zero", host_mode=host_mode, top_k=experts, num_experts=experts))
    fused = get_method("lfuc").build(dense, plan)
    assert type(fused).__name__ == MOE_CLASS[arch]
    assert fused.config.num_hidden_layers == 3 and fused.config.mlp_only_layers == [0]
    reference = fused_reference(dense, blocks)
    torch.testing.assert_close(logits(fused), logits(reference), rtol=1e-5, atol=1e-5)
    # ... and the surgery matters: the reference is not the dense model
    assert (logits(reference) - logits(dense)).abs().max() > 1e-3


def test_alpha_beta_and_top1_change_the_mix():
    dense = tiny_dense("llama")
    blocks = [Block(1, [2, 3])]
    full = get_method("lfuc").build(dense, Plan("lfuc", 6, blocks, Options(host_mode="shared", router_init="zero", top_k=2)))
    top1 = get_method("lfuc").build(dense, Plan("lfuc", 6, blocks, Options(host_mode="shared", router_init="zero", top_k=1)))
    half = get_method("lfuc").build(dense, Plan("lfuc", 6, blocks, Options(host_mode="shared", router_init="zero", top_k=2, alpha=0.5, beta=0.5)))
    assert not torch.allclose(logits(full), logits(top1))
    assert not torch.allclose(logits(full), logits(half))
    # top-1 with a zero router reads exactly one expert per token
    assert top1.config.num_experts_per_tok == 1 and top1.config.num_experts == 2


def test_replication_fills_num_experts():
    dense = tiny_dense("llama")
    fused = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(0, [1, 2]), Block(3, [4])], Options(host_mode="shared", router_init="zero", num_experts=4)))
    experts = fused.model.layers[1].mlp.experts.down_proj       # host 3 → new layer 1, one donor
    assert experts.shape[0] == 4
    assert all(torch.equal(experts[0], experts[i]) for i in range(1, 4))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_prune_equals_dense_with_layers_deleted(arch):
    dense = tiny_dense(arch)
    pruned = get_method("prune").build(dense, Plan("prune", 6, [Block(1, [2, 3])]))
    reference = copy.deepcopy(dense)
    del reference.model.layers[3]
    del reference.model.layers[2]
    assert type(pruned) is type(dense) and pruned.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=0, atol=0)


def test_calibrated_router_prefers_the_strongest_expert():
    from d2m_export.methods.lfuc import fit_router

    torch.manual_seed(0)
    h, i = 16, 24
    weak = (torch.randn(2 * i, h) * 0.01, torch.randn(h, i) * 0.01)
    strong = (torch.randn(2 * i, h), torch.randn(h, i))
    u = torch.randn(256, h) + 1.0   # a bias-free router needs inputs with a mean, as real ones have
    w = fit_router(u, [weak, strong], "silu", steps=100)
    assert ((u @ w.T).argmax(-1) == 1).float().mean() > 0.95


def test_saved_checkpoint_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_dense("llama")
    fused = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(2, [3, 4])], Options(host_mode="shared", router_init="zero", top_k=1)))
    fused.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)   # no remote code
    assert torch.equal(logits(loaded.eval()), logits(fused))


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method, host_mode", [("prune", "routed"), ("lfuc", "routed"), ("lfuc", "shared"),
                                               ("upcycle", "routed")])
def test_parameter_counts_from_the_config_match_the_model(arch, method, host_mode):
    """What the planner and the roofline cost (params.py) is what the converted model stores."""
    from d2m_export.sources.params import param_counts

    dense = tiny_dense(arch)
    blocks = [] if method == "upcycle" else [Block(1, [2, 3])]
    model = get_method(method).build(dense, Plan(method, 6, blocks, Options(host_mode=host_mode, router_init="zero")))
    stored = sum(p.numel() for p in model.parameters())        # tied: the embedding once
    assert param_counts(model.config).total == stored
