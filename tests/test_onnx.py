"""ONNX export run in ONNX Runtime, checked against transformers independently.

Tiny random models: dense Llama and Qwen2 (head size 8, which GroupQueryAttention only takes padded,
and 16, which it takes as is), and LF-UC Qwen2MoE conversions (shared and routed host, top-1 and
top-2, a zero and a non-zero shared-expert gate) whose routers are made random so that routing
matters. Tests that break the exporter on purpose check that the parity check catches it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import export_with_cli, run_cli, save_with_tokenizer, tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BLOCKS = [Block(1, [2, 3]), Block(4, [5])]      # 6 layers -> 3: dense, MoE, MoE
MOE_VARIANTS = ["lfuc-shared-k1", "lfuc-shared-k2", "lfuc-routed-k1", "lfuc-routed-k2", "lfuc-gated-k2"]
VARIANTS = ["llama", "qwen2", "llama-hd16", *MOE_VARIANTS]
QWEN3_MOE_VARIANTS = ["lfuc-routed-k1-qwen3", "lfuc-shared-k2-qwen3"]     # Qwen3 bases: q/k norms
PROMPT = [504, 3459, 8089, 12480, 690, 260, 23790, 2767, 30]
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_matches_transformers_greedy(capsys, models, tmp_path, variant):
    from runtimes.base import load_runner

    out = tmp_path / "export"
    manifest = export(capsys, models[variant], out)
    assert {"target", "files", "base_model", "plan", "quant", "context_length", "tokenizer", "parity"} <= manifest.keys()
    assert manifest["target"] == "onnx" and manifest["quant"] == "fp32" and manifest["context_length"] == 256
    assert manifest["files"] == ["model.onnx", "model.onnx.data", "genai_config.json"]
    assert (out / "tokenizer.json").is_file()
    parity = manifest["parity"]
    assert parity["greedy_total"] >= 32 and parity["greedy_match"] == parity["greedy_total"]
    assert parity["max_abs_logit_err"] < 1e-4
    genai = parity["other_runtimes"]["onnxruntime-genai"]        # the same check, run in ONNX Runtime GenAI
    assert genai["greedy_match"] == genai["greedy_total"] == parity["greedy_total"] and genai["max_abs_logit_err"] < 1e-4

    model = hf_model(models[variant])
    if "lfuc" in variant:       # routing really varies: tokens take different expert sets in every MoE layer
        chosen = routed_experts(model, PROMPT + parity["prompts"][0]["reference_tokens"])
        assert chosen and all(len({tuple(sorted(row)) for row in c.tolist()}) > 1 for c in chosen.values())
    # Independently of the exporter's own check: free-running greedy decoding in ONNX Runtime
    # reproduces transformers' generate() token for token.
    with load_runner(out, threads=2) as runner:
        got = runner.generate(PROMPT, 40)
    assert got == hf_greedy(model, PROMPT, 40)
    # and ONNX Runtime GenAI's own generate() loop, as an app runs it, gives the same tokens
    assert genai_generate(out, PROMPT, 40) == got


def genai_generate(export_dir, prompt_ids, n):
    """Greedy tokens from onnxruntime_genai's own search, configured only by the export's genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([list(prompt_ids)])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]]


def graph_of(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("variant", ["llama", "lfuc-shared-k2", "lfuc-routed-k1", "lfuc-gated-k2"])
def test_gather_lowering_routes_in_plain_onnx_with_each_experts_own_matmuls(capsys, models, tmp_path, variant):
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "gather",
                       "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    graph = graph_of(tmp_path / "e")
    model = hf_model(models[variant])
    cfg = model.config
    assert manifest["onnx"]["moe_lowering"] == "gather" and manifest["onnx"]["moe_nodes"] == 0
    assert not [n for n in graph.node if n.op_type in ("MoE", "QMoE")]
    assert len([n for n in graph.node if n.op_type == "GroupQueryAttention"]) == cfg.num_hidden_layers
    # one scatter per expert per MoE layer, each expert's weights in their own gate_up / down pair
    experts = len(moe_layers(model)) * getattr(cfg, "num_experts", 0)
    assert len([n for n in graph.node if n.op_type == "ScatterND"]) == experts
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    expert_weights = [n for n in shapes if ".experts." in n and n.endswith(".weight_t")]
    assert len(expert_weights) == 2 * experts
    if experts:     # top-1 renormalised needs no routing weights (ArgMax); top-k goes through TopK
        picks = {n.op_type for n in graph.node if n.op_type in ("ArgMax", "TopK")}
        assert picks == ({"ArgMax"} if cfg.num_experts_per_tok == 1 else {"TopK"})
    # a tied embedding / LM head is stored once
    assert sum(1 for s in shapes.values() if cfg.vocab_size in s) == 1
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


@pytest.mark.parametrize("variant", ["lfuc-shared-k2", "lfuc-routed-k1", "lfuc-gated-k2"])
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_sparse_lowering_has_one_moe_node_per_moe_layer_and_matches(capsys, models, tmp_path, variant, quant):
    lowering = ["--moe-lowering", "sparse"] if quant == "fp32" else []      # int4's default
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--quant", quant, *lowering,
                       "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "sparse"
    if quant == "fp32":
        assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    graph = graph_of(tmp_path / "e")
    model = hf_model(models[variant])
    cfg = model.config
    op = "MoE" if quant == "fp32" else "QMoE"
    moe_nodes = [n for n in graph.node if n.op_type == op and n.domain == "com.microsoft"]
    assert len(moe_nodes) == len(moe_layers(model)) == manifest["onnx"]["moe_nodes"]
    if quant != "fp32":
        return
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in moe_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == cfg.num_experts_per_tok and attrs["normalize_routing_weights"] == 1
        assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1
        # all experts live in one fc1/fc2 pair (no per-expert subgraphs): [E, 2I, H] and [E, H, I]
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        assert shapes[node.input[2]] == [e, 2 * i, h] and shapes[node.input[4]] == [e, h, i]


def branch_weights(graph) -> tuple[dict, list]:
    """Per `If` node of the switch lowering, the expert nodes of its taken branch and the names of the
    initializers that branch owns; and the expert products anywhere else (routing aside)."""
    branches = {}
    elsewhere = [n for n in graph.node if ".experts." in n.name and n.op_type in ("MatMul", "MatMulNBits", "MoE", "QMoE")
                 and not n.name.endswith(".distinct_weights")]
    for node in graph.node:
        if node.op_type == "If":
            run = next(a.g for a in node.attribute if a.name == "then_branch")
            branches[node.name] = ([n for n in run.node if ".experts." in n.name], {t.name for t in run.initializer})
    return branches, elsewhere


@pytest.mark.parametrize("variant,quant", [(v, "fp32") for v in MOE_VARIANTS + QWEN3_MOE_VARIANTS]
                         + [("lfuc-routed-k1", "int4"), ("lfuc-shared-k2-qwen3", "int4"), ("lfuc-routed-k2", "int8"),
                            ("lfuc-routed-k1", "fp16")])
def test_switch_lowering_keeps_each_experts_weights_in_its_own_branch_and_matches(capsys, models, tmp_path, variant,
                                                                                  quant):
    """Prompt and one-token steps, in onnxruntime and onnxruntime-genai: each distinct expert is one `If` whose
    branch owns its weights (so ONNX Runtime prepacks them); no expert weight lives outside its branch."""
    from converters.onnx import OnnxExporter
    from converters.parity import text_gate_failure

    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "switch",
                       "--quant", quant, "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "switch" and manifest["onnx"]["moe_nodes"] == 0
    parity, tol = manifest["parity"], OnnxExporter.tolerances[quant]
    genai = parity["other_runtimes"]["onnxruntime-genai"]
    for checked in (parity, genai):
        assert checked["greedy_match"] == parity["greedy_total"] if quant == "fp32" else (
            text_gate_failure(checked["text"], tol) is None)
        if quant == "fp32":
            assert checked["max_abs_logit_err"] < 1e-4
    model = hf_model(models[variant])
    cfg = model.config
    graph = graph_of(tmp_path / "e")
    branches, elsewhere = branch_weights(graph)
    assert not elsewhere, [n.name for n in elsewhere]
    distinct = sum(len({(e.gate_up_proj[j].detach().numpy().tobytes(), e.down_proj[j].detach().numpy().tobytes())
                        for j in range(cfg.num_experts)})
                   for e in (model.model.layers[i].mlp.experts for i in moe_layers(model)))
    assert len(branches) == distinct                 # replicated experts share one branch
    matmul = "MatMul" if quant in ("fp32", "fp16") else "MatMulNBits"
    for nodes, owned in branches.values():
        products = [n for n in nodes if n.op_type == matmul]
        assert len(products) == 2                    # gate/up and down, each reading a weight the branch owns
        for n in products:
            weight = n.input[1]
            if quant == "fp16":                      # a Cast of the branch's own fp16 initializer
                weight = next(c.input[0] for c in nodes if c.output[0] == weight and c.op_type == "Cast")
            assert weight in owned, n.name
    main = {t.name for t in graph.initializer}
    assert not [t for t in main if ".experts." in t and ("weight" in t or "scales" in t)]


def test_switch_lowering_stores_a_replicated_expert_once(capsys, tmp_path, tokenizer_dir):
    """LF-UC replicates a short block's MLPs up to N experts: the copies share one branch, their weights add."""
    plan = Plan("lfuc", 6, [Block(1, [2, 3])], Options(host_mode="routed", top_k=2, num_experts=5, router_init="zero"))
    moe = get_method("lfuc").build(sensitive(tiny_dense("llama")), plan)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        gate = moe.model.layers[1].mlp.gate.weight
        gate.copy_(torch.randn(gate.shape, generator=g))
    model_dir = save_with_tokenizer(moe, tmp_path / "m", tokenizer_dir)
    code, _, err = run(capsys, "--target", "onnx", "--model", model_dir, "--moe-lowering", "switch", "--threads", 2,
                       "--out", tmp_path / "e")
    assert code == 0, err
    parity = json.loads((tmp_path / "e" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"]
    branches, _ = branch_weights(graph_of(tmp_path / "e"))
    assert len(branches) == 3                       # 5 expert slots, 3 distinct MLPs


@pytest.mark.parametrize("variant", ["lfuc-shared-k2", "lfuc-routed-k1"])
def test_dense_mask_lowering_computes_every_expert_and_matches(capsys, models, tmp_path, variant):
    """The comparison lowering (optimum's way): no MoE node, all experts' weights in two MatMuls, same tokens."""
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "dense",
                       "--threads", 2, "--out", tmp_path / "dense")
    assert code == 0, err
    manifest = json.loads((tmp_path / "dense" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "dense" and manifest["onnx"]["moe_nodes"] == 0
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    cfg = hf_model(models[variant]).config
    shapes = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "dense" / "model.onnx"),
                                                       load_external_data=False).graph.initializer}
    e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert sum(1 for s in shapes.values() if s == [h, e * 2 * i]) == len(moe_layers(hf_model(models[variant])))
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "dense",
                       "--quant", "int4", "--out", tmp_path / "q")
    assert code == 2 and "fp32 only" in err and not (tmp_path / "q").exists()


def test_graph_works_the_optimum_way_with_growing_past(capsys, models, tmp_path):
    """A consumer that feeds `present.*` back as `past_key_values.*` (no shared buffer) gets the runner's logits."""
    from runtimes.base import load_runner

    out = tmp_path / "e"
    manifest = export(capsys, models["lfuc-shared-k2"], out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    layers, heads, head_dim = manifest["onnx"]["num_layers"], manifest["onnx"]["kv_heads"], manifest["onnx"]["kv_head_dim"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, heads, 0, head_dim), np.float32)
            for i in range(layers) for kv in ("key", "value")}
    ids, plain = list(PROMPT), []
    step = ids
    for _ in range(6):
        n_past = next(iter(past.values())).shape[2]
        feed = {"input_ids": np.array([step], np.int64),
                "attention_mask": np.ones((1, n_past + len(step)), np.int64),
                "position_ids": np.arange(n_past, n_past + len(step), dtype=np.int64)[None], **past}
        logits, *presents = session.run(None, feed)
        past = dict(zip(past, presents))
        plain.append(logits[0, -1])
        step = [int(logits[0, -1].argmax())]
        ids += step
    with load_runner(out, threads=1) as runner:
        bound = [runner.prefill(PROMPT)] + [runner.decode(t) for t in ids[len(PROMPT):-1]]
    np.testing.assert_allclose(np.stack(bound), np.stack(plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize("breakage", ["gate_up_not_interleaved", "routing_not_renormalised",
                                      "gather_not_renormalised", "gather_experts_swapped",
                                      "switch_not_renormalised", "switch_experts_swapped"])
def test_a_wrong_moe_export_fails_parity_and_leaves_nothing(capsys, models, tmp_path, monkeypatch, breakage):
    import converters.onnx_moe as graph
    import converters.onnx_ops as ops

    lowering, variant = "sparse", "lfuc-shared-k2"
    if breakage == "gate_up_not_interleaved":
        monkeypatch.setattr(graph, "interleave_gate_up", lambda w: w)
    elif breakage == "routing_not_renormalised":
        original = ops.moe_attrs
        monkeypatch.setattr(ops, "moe_attrs", lambda k, normalize: original(k, False))
    else:                       # the in-graph lowerings: switch or gather
        lowering = breakage.split("_")[0]
        function = {"switch": "switched_experts", "gather": "gathered_experts"}[lowering]
        original = getattr(graph, function)
        if breakage.endswith("not_renormalised"):
            monkeypatch.setattr(graph, function, lambda *a: original(*a[:-2], False, a[-1]))
        else:       # top-1 routed host: expert j's rows run through expert j+1's weights
            variant = "lfuc-routed-k1"
            monkeypatch.setattr(graph, function, lambda g, lin, x, logits, gu, down, *a: original(
                g, lin, x, logits, np.roll(gu, 1, axis=0), np.roll(down, 1, axis=0), *a))
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", lowering,
                       "--out", tmp_path / "o")
    assert code == 1 and "parity check failed" in err
    assert list(tmp_path.iterdir()) == []


def test_runner_state_reset_and_context_limit(capsys, models, tmp_path):
    from d2m_export.errors import UserError
    from runtimes.base import load_runner

    out = tmp_path / "e"
    export(capsys, models["lfuc-routed-k2"], out)
    with load_runner(out, threads=1, n_ctx=len(PROMPT) + 3) as runner:
        first = runner.prefill(PROMPT)
        a = [runner.decode(7), runner.decode(8)]
        again = runner.prefill(PROMPT)            # a new sequence starts from scratch
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(a, [runner.decode(7), runner.decode(8)])
        runner.decode(9)
        with pytest.raises(UserError, match="exceeds n_ctx"):
            runner.decode(10)
    with pytest.raises(UserError, match="exceeds the export"):
        load_runner(out, n_ctx=10**6)


@pytest.mark.parametrize("argv, needle", [
    (["--quant", "int3"], "--quant 'int3'"),
    (["--quant", "q8_0"], "--quant 'q8_0'"),
    (["--quant", "int4", "--head-bits", "5"], "--head-bits must be 4 or 8"),
    (["--head-bits", "8"], "--head-bits applies to --quant int8 and int4"),
])
def test_bad_input_exits_2_and_writes_nothing(capsys, models, tmp_path, argv, needle):
    code, _, err = run(capsys, "--target", "onnx", "--model", models["llama"], "--out", tmp_path / "o", *argv)
    assert code == 2 and needle in err and err.count("d2m-export: error:") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", ["llama", "lfuc-shared-k2"])
def test_fp16_weights_halve_the_file_and_keep_the_tokens(capsys, models, tmp_path, variant):
    fp32 = export(capsys, models[variant], tmp_path / "fp32")
    fp16 = export(capsys, models[variant], tmp_path / "fp16", quant="fp16")
    assert fp16["quant"] == "fp16" and fp16["onnx"]["weights"] == "fp16"
    assert fp16["sizes_mb"]["model.onnx.data"] < 0.6 * fp32["sizes_mb"]["model.onnx.data"]
    p = fp16["parity"]
    assert p["greedy_match"] >= 0.9 * p["greedy_total"] and p["max_abs_logit_err"] < 1.0


def test_unknown_target_unlowerable_model_and_foreign_out_dir(capsys, models, tmp_path):
    from transformers import AutoModelForCausalLM

    code, _, err = run(capsys, "--target", "tflite", "--model", models["llama"], "--out", tmp_path / "o")
    assert code == 2 and "unknown --target 'tflite'" in err and "onnx" in err
    gelu = tmp_path / "gelu"
    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(gelu)
    for f in models["llama"].iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, gelu / f.name)
    cfg = json.loads((gelu / "config.json").read_text())
    (gelu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    code, _, err = run(capsys, "--target", "onnx", "--model", gelu, "--out", tmp_path / "o")
    assert code == 2 and "SiLU" in err and "'gelu'" in err and not (tmp_path / "o").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "--target", "onnx", "--model", models["llama"], "--out", foreign)
    assert code == 2 and str(foreign) in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # the model folder itself (or one around it) is never an output: it would be replaced
    before = sorted(p.name for p in models["llama"].iterdir())
    for out in (models["llama"], models["llama"].parent):
        code, _, err = run(capsys, "--target", "onnx", "--model", models["llama"], "--out", out)
        assert code == 2 and "would overwrite the model" in err
    assert sorted(p.name for p in models["llama"].iterdir()) == before


def test_bench_and_generate(capsys, models, tmp_path):
    out = tmp_path / "e"
    export(capsys, models["lfuc-shared-k1"], out)
    code, stdout, err = run(capsys, "bench", out, "--prompt-tokens", 16, "--new-tokens", 8, "--repeats", 1,
                            "--out", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["target"] == "onnx" and result["threads"] == 2 and result["decode_tokens_per_s"] > 0
    assert result["runtime_settings"]["io_binding"] is True
    code, stdout, err = run(capsys, "generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 8)
    assert code == 0, err
    assert stdout.startswith("Once upon a time") and len(stdout) > len("Once upon a time")
    manifest = (out / "manifest.json").read_text()
    code, _, err = run(capsys, "bench", out, "--out", out / "manifest.json")    # would clobber the export
    assert code == 2 and "inside the export" in err and (out / "manifest.json").read_text() == manifest
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "bench", out, "--out", tmp_path / "a-file" / "b.json")      # an impossible path
    assert code == 2 and err.startswith("d2m-export: error:") and "a-file" in err


def test_bench_and_generate_in_onnxruntime_genai(capsys, models, tmp_path):
    from d2m_export.errors import UserError
    from runtimes.base import load_runner

    out = tmp_path / "e"
    export(capsys, models["lfuc-routed-k2"], out)
    code, _, err = run(capsys, "bench", out, "--runtime", "onnxruntime-genai", "--prompt-tokens", 16, "--new-tokens", 8,
                       "--repeats", 1, "--out", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["runtime"] == "onnxruntime-genai" and result["decode_tokens_per_s"] > 0
    assert result["runtime_settings"]["runtime"].startswith("onnxruntime-genai")
    code, stdout, err = run(capsys, "generate", out, "--runtime", "onnxruntime-genai", "--prompt", "Once upon a time",
                            "--max-new-tokens", 12)
    assert code == 0, err
    code, ours, err = run(capsys, "generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 12)
    assert code == 0 and stdout == ours                                 # fp32: the same text in both runtimes
    with load_runner(out, runtime="onnxruntime-genai", n_ctx=12) as runner:     # state, reset and its limit
        a = runner.prefill(PROMPT[:4])
        np.testing.assert_array_equal(a, runner.prefill(PROMPT[:4]))
        runner.decode(1)
        with pytest.raises(UserError, match="exceeds n_ctx"):
            runner.prefill(PROMPT + PROMPT)


@pytest.mark.parametrize("runtime, needle", [("nope", "unknown --runtime 'nope'; for onnx exports: onnx, onnxruntime-genai"),
                                             ("gguf", "--runtime gguf does not run onnx exports; choose one of onnx, "
                                                      "onnxruntime-genai")])
def test_unknown_or_foreign_runtime_exits_2(capsys, models, tmp_path, runtime, needle):
    out = tmp_path / "e"
    export(capsys, models["llama"], out)
    code, _, err = run(capsys, "bench", out, "--runtime", runtime, "--out", tmp_path / "b.json")
    assert code == 2 and needle in err and err.count("\n") == 1 and not (tmp_path / "b.json").exists()
    (out / "genai_config.json").unlink()                                # an export from before genai_config.json
    manifest = json.loads((out / "manifest.json").read_text())         # (and before checksums)
    del manifest["checksums"]
    manifest["files"].remove("genai_config.json")
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "generate", out, "--runtime", "onnxruntime-genai", "--prompt", "Hi")
    assert code == 2 and "has no genai_config.json" in err


def test_interleaved_rounds_time_every_export_in_turn(capsys, models, tmp_path):
    from d2m_export.errors import UserError
    from runtimes.bench import interleaved

    exports = {name: tmp_path / name for name in ("llama", "lfuc-routed-k1")}
    for name, out in exports.items():
        export(capsys, models[name], out)
    result = interleaved(exports, rounds=3, tokens=4, prompt_tokens=8, threads=1)
    assert set(result["variants"]) == set(exports) and result["rounds"] == 3
    for v in result["variants"].values():
        assert 0 < v["spread_ms"][0] <= v["decode_ms_per_token"] <= v["spread_ms"][1]
    up, down = result["speedups"]["llama over lfuc-routed-k1"], result["speedups"]["lfuc-routed-k1 over llama"]
    assert up["spread"][0] <= up["median"] <= up["spread"][1]
    assert up["median"] * down["median"] == pytest.approx(1, rel=0.05)    # one run's two views of the same rounds
    with pytest.raises(UserError, match="at least 3"):
        interleaved(exports, rounds=2)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_gather_lowering_quantizes_every_expert_and_passes_its_floor(capsys, models, tmp_path, quant):
    """MatMulNBits per expert; a decode step leaves most experts with zero rows, which the kernels must take."""
    from converters.onnx import OnnxExporter
    from converters.parity import text_gate_failure

    code, _, err = run(capsys, "--target", "onnx", "--model", models["lfuc-routed-k1"], "--moe-lowering", "gather",
                       "--quant", quant, "--threads", 2, "--out", tmp_path / "q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    parity = manifest["parity"]
    tol = OnnxExporter.tolerances[quant]
    assert text_gate_failure(parity["text"], tol) is None
    model = hf_model(models["lfuc-routed-k1"])
    experts = len(moe_layers(model)) * model.config.num_experts
    nbits = [n.name for n in graph_of(tmp_path / "q").node if n.op_type == "MatMulNBits"]
    assert len([n for n in nbits if ".experts." in n]) == 2 * experts


@pytest.mark.parametrize("head_bits", [None, 8])
def test_int4_head_bits_follow_the_quant_unless_asked(capsys, models, tmp_path, head_bits):
    """int4 stores the tied LM head / embedding in int4 (as ONNX Runtime GenAI's builder); --head-bits 8 keeps it at int8."""
    argv = ["--head-bits", str(head_bits)] if head_bits else []
    code, _, err = run(capsys, "--target", "onnx", "--model", models["llama"], "--quant", "int4", *argv,
                       "--threads", 2, "--out", tmp_path / "q")
    assert code == 0, err
    nodes = {n.name: n for n in graph_of(tmp_path / "q").node}
    bits = {a.name: a.i for a in nodes["embed"].attribute}["bits"]
    head = {a.name: a.i for a in nodes["lm_head"].attribute}["bits"]
    assert nodes["embed"].op_type == "GatherBlockQuantized" and bits == head == (head_bits or 4)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["parity"]["other_runtimes"]["onnxruntime-genai"]["greedy_match"] >= 0.5 * manifest["parity"]["greedy_total"]


OPTIMUM_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"      # made by `make test` (optimum pins another transformers)
OPTIMUM_GENERATE = """
import json, sys, onnxruntime as ort, torch
from optimum.onnxruntime import ORTModelForCausalLM
so = ort.SessionOptions(); so.intra_op_num_threads = 1
model = ORTModelForCausalLM.from_pretrained(sys.argv[1], session_options=so, use_cache=True, use_io_binding=False)
model.generation_config.eos_token_id = None
ids = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


@pytest.mark.skipif(not OPTIMUM_PYTHON.is_file(), reason="no .venv-optimum: `make test` (or `make optimum-env`) makes it")
@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_optimum_runs_our_moe_export_with_our_greedy_tokens(capsys, tmp_path, tokenizer_dir, base):
    """optimum's ORTModelForCausalLM, unpatched, generates our runner's greedy tokens with an LF-UC export
    (grouped KV heads: 2 query heads, 1 KV head; head size 16, so no padding)."""
    import subprocess

    from runtimes.base import load_runner

    plan = Plan("lfuc", 6, BLOCKS, Options(host_mode="routed", top_k=1, num_experts=4, router_init="zero"))
    moe = get_method("lfuc").build(sensitive(tiny_dense(base, num_attention_heads=2, num_key_value_heads=1)), plan)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g))
    model_dir = save_with_tokenizer(moe, tmp_path / "lfuc", tokenizer_dir)
    out = tmp_path / "onnx"
    manifest = export(capsys, model_dir, out)
    assert manifest["onnx"]["moe_lowering"] == "switch" and manifest["onnx"]["kv_heads"] == 1     # fp32's default
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["d2m_model_type"] == "qwen2_moe"
    res = subprocess.run([str(OPTIMUM_PYTHON), "-c", OPTIMUM_GENERATE, str(out), json.dumps(PROMPT), "24"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with load_runner(out, threads=1) as runner:
        ours = runner.generate(PROMPT, 24)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ours
