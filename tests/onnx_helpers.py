"""What the ONNX tests (test_onnx.py, test_onnx_graph.py) and the web tests (test_web.py) share: tiny
random dense and LF-UC models whose every weight moves the logits, made once per test module, and
transformers' view of them (greedy tokens, MoE layers, the experts each token takes).
"""
from __future__ import annotations

import pytest
import torch

from conftest import export_with_cli, run_cli, save_with_tokenizer, tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

BLOCKS = [Block(1, [2, 3]), Block(4, [5])]      # 6 layers -> 3: dense, MoE, MoE
MOE_VARIANTS = ["lfuc-shared-k1", "lfuc-shared-k2", "lfuc-routed-k1", "lfuc-routed-k2", "lfuc-gated-k2"]
VARIANTS = ["llama", "qwen2", "llama-hd16", *MOE_VARIANTS]
QWEN3_MOE_VARIANTS = ["lfuc-routed-k1-qwen3", "lfuc-shared-k2-qwen3"]     # Qwen3 bases: q/k norms
PROMPT = [504, 3459, 8089, 12480, 690, 260, 23790, 2767, 30]


def sensitive(model, seed: int = 0):
    """Re-draw a tiny model's weights at unit scale (matrices ~ N(0, 1/fan_in), embedding ~ N(0, 1)) so that
    every layer, and so every MoE detail, moves the logits; at the default init (std 0.02) the residual
    stream is nearly the embedding alone and an export error can hide below any tolerance. The final norm is
    scaled down so that the next-token distributions are about as peaked as a trained model's: at unit scale the
    logits span tens of nats, and an int4 export's sound rounding noise moves them further than the lossy parity
    gates (set on SmolLM2) allow."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        model.model.norm.weight.mul_(0.3)
    return model


def build(variant: str):
    if variant == "llama-hd16":
        return sensitive(tiny_dense("llama", num_attention_heads=2, num_key_value_heads=1))
    if variant in ("llama", "qwen2"):
        return sensitive(tiny_dense(variant))
    _, mode, k, *family = variant.split("-")
    top_k = int(k[1])
    host_mode = "routed" if mode == "routed" else "shared"
    base = family[0] if family else "qwen2" if mode == "gated" else "llama"
    plan = Plan("lfuc", 6, BLOCKS, Options(host_mode=host_mode, top_k=top_k, num_experts=3 if host_mode == "shared" else 4,
                                           router_init="zero"))
    moe = get_method("lfuc").build(sensitive(tiny_dense(base)), plan)
    g = torch.Generator().manual_seed(top_k)
    with torch.no_grad():       # a random router: different tokens take different experts
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g))
                if mode == "gated":     # a trained shared-expert gate: sigmoid(x·w) instead of the folded 0.5
                    layer.mlp.shared_expert_gate.weight.copy_(
                        0.5 * torch.randn(layer.mlp.shared_expert_gate.weight.shape, generator=g))
    return moe


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("onnx-models")
    dirs = {}
    for variant in VARIANTS + QWEN3_MOE_VARIANTS:
        dirs[variant] = save_with_tokenizer(build(variant), root / variant, tokenizer_dir)
    return dirs


run = run_cli


def export(capsys, model_dir, out, quant=None):
    return export_with_cli(capsys, "onnx", model_dir, out, quant)


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def hf_greedy(model, prompt_ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def routed_experts(model, ids) -> dict[int, torch.Tensor]:
    """Per MoE layer, the [tokens, top_k] experts transformers selects for `ids`."""
    chosen, hooks = {}, []
    for i in moe_layers(model):
        hooks.append(model.model.layers[i].mlp.gate.register_forward_hook(
            lambda mod, args, out, i=i: chosen.__setitem__(i, out[2])))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return chosen
