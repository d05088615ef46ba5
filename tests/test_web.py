"""`--target web`: folders transformers.js loads from local files, run in Node and checked against transformers.

Tiny random models (dense Llama, Qwen2, Qwen3; LF-UC conversions on Llama, Qwen2 and Qwen3 bases with random
routers, and what our own `convert` writes for each base) are exported with `--target web`; then, apart from
the export's own parity check, transformers.js's `generate()` in Node (web/d2m_web.mjs, onnxruntime-node on the
CPU) must give the greedy tokens transformers' `generate()` gives: every token at fp32, a floor for q8/q4.
Needs Node and `make web` (npm ci in web/); skipped without them.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import assert_user_error, export_with_cli, run_cli, save_with_tokenizer, tiny_dense

onnx = pytest.importorskip("onnx")
from converters.onnx_moe import distinct_experts  # noqa: E402
from runtimes.transformersjs import SCRIPT, WEB_DIR  # noqa: E402
from onnx_helpers import PROMPT, build, hf_greedy, hf_model, moe_layers, routed_experts, sensitive  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("node") is None or not (WEB_DIR / "node_modules").is_dir(),
                                reason="needs Node.js and web/node_modules (make web)")

DENSE = ["llama", "qwen2", "qwen3"]
MOE = ["lfuc-routed-k1", "lfuc-gated-k2", "lfuc-routed-k1-qwen3", "lfuc-shared-k2-qwen3"]
CONVERTED = ["lfuc", "lfuc-qwen2", "lfuc-qwen3", "prune"]   # `convert`'s defaults on each base, and pruning
SUFFIX = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("web-models")
    made = {}

    def make(variant: str):
        if variant not in made:
            model = sensitive(tiny_dense(variant)) if variant in DENSE else build(variant)
            made[variant] = save_with_tokenizer(model, root / variant, tokenizer_dir)
        return made[variant]

    return make


def node_generate(export_dir, prompt_ids, n, backend="node"):
    """transformers.js generate(), greedy, in a fresh Node process: the script's one-shot command."""
    res = subprocess.run(["node", str(SCRIPT), "generate", str(export_dir), "--ids", ",".join(map(str, prompt_ids)),
                          "--max-new-tokens", str(n), "--threads", "2", "--backend", backend],
                         capture_output=True, text=True, timeout=300, cwd=WEB_DIR)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def graph_of(out, quant="fp32"):
    return onnx.load(str(out / "onnx" / f"model{SUFFIX[quant]}.onnx"), load_external_data=False).graph


def check_layout(out, manifest, quant):
    """The folder transformers.js 4.x loads: config (with transformers.js_config), tokenizer, onnx/model{suffix}.onnx
    and its data file, whose name is the location the graph stores."""
    graph_file = f"onnx/model{SUFFIX[quant]}.onnx"
    assert manifest["target"] == "web" and manifest["quant"] == quant
    assert manifest["files"] == [graph_file, graph_file + "_data", "index.html", "page.js"]   # and the page
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": quant, "use_external_data_format": {graph_file[5:]: 1}}
    graph = graph_of(out, quant)
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {f"model{SUFFIX[quant]}.onnx_data"}
    names = [i.name for i in graph.input]
    layers = manifest["web"]["num_layers"]
    assert names == ["input_ids", "attention_mask", "position_ids",
                     *(f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")),
                     "num_logits_to_keep"]      # generate() feeds 1: a prompt's LM head on its last position only
    assert [o.name for o in graph.output] == ["logits", *(f"present.{i}.{kv}" for i in range(layers)
                                                          for kv in ("key", "value"))]
    # the KV cache grows: past and present have symbolic sequence lengths
    past, present = graph.input[3].type.tensor_type.shape.dim, graph.output[1].type.tensor_type.shape.dim
    assert past[2].dim_param and present[2].dim_param and past[2].dim_param != present[2].dim_param
    # MoE routing in plain ONNX: no MoE/QMoE kernel (WebGPU has none)
    assert not [n for n in graph.node if n.op_type in ("MoE", "QMoE")]
    # an If per expert; q8 gather: its kernel quantizes the activations of exactly the rows routed to the expert
    assert manifest["web"]["moe_lowering"] == ("gather" if quant == "q8" else "switch")
    return graph


def expert_branches(graph) -> list:
    """The then-branches of the graph's Ifs (one per distinct expert), each holding its expert's weights in the
    graph file: onnxruntime-web reads no external data inside a branch."""
    branches = [a.g for n in graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch"]
    assert all(b.initializer and not any(t.external_data for t in b.initializer) for b in branches)
    return branches


def exact(parity):
    assert parity["greedy_match"] == parity["greedy_total"] >= 64 and parity["max_abs_logit_err"] < 1e-4
    wasm = parity["other_runtimes"]["web-wasm"]          # onnxruntime-web's WebAssembly build, in Node
    assert wasm["greedy_match"] == wasm["greedy_total"] == parity["greedy_total"] and wasm["max_abs_logit_err"] < 1e-4
    gen = parity["generate"]                             # transformers.js generate(), as an app calls it
    assert gen["tokenizer_match"] and gen["prefix_match"] == gen["total"] == parity["greedy_total"]


@pytest.mark.parametrize("variant", DENSE + MOE)
def test_fp32_generates_transformers_greedy_tokens_in_node(capsys, models, tmp_path, variant):
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", models(variant), out)
    graph = check_layout(out, manifest, "fp32")
    exact(manifest["parity"])
    assert manifest["parity"]["runtime_settings"]["runtime"] == "transformers.js + onnxruntime-node (cpu)"
    model = hf_model(models(variant))
    if variant in MOE:          # routing really varies, and each expert has its own If branch with its weights
        chosen = routed_experts(model, PROMPT + manifest["parity"]["prompts"][0]["reference_tokens"])
        assert chosen and all(len({tuple(sorted(row)) for row in c.tolist()}) > 1 for c in chosen.values())
        experts = [model.model.layers[i].mlp.experts for i in moe_layers(model)]
        assert len(expert_branches(graph)) == sum(len(distinct_experts(e.gate_up_proj.detach().numpy(),
                                                                       e.down_proj.detach().numpy())) for e in experts)
    # independently of the export's check: a fresh Node process, transformers.js generate() from the folder
    got = node_generate(out, PROMPT, 40)
    assert got["tokens"] == hf_greedy(model, PROMPT, 40)
    assert got["settings"]["model_class"].endswith("ForCausalLM") and got["settings"]["dtype"] == "fp32"


@pytest.mark.parametrize("layout", CONVERTED)
def test_models_our_convert_writes_generate_the_same_tokens(capsys, converted, tmp_path, layout):
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", converted(layout), out)
    check_layout(out, manifest, "fp32")
    exact(manifest["parity"])
    config = json.loads((out / "config.json").read_text())
    got = node_generate(out, PROMPT, 24)
    if layout.startswith("lfuc"):            # transformers.js's own MoE classes load it
        assert config["model_type"] in ("qwen2_moe", "qwen3_moe")
        assert got["settings"]["model_class"] in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    else:                                    # fewer layers, the base's class
        assert manifest["web"]["num_layers"] < 6 and got["settings"]["model_class"] == "LlamaForCausalLM"
    assert got["tokens"] == hf_greedy(hf_model(converted(layout)), PROMPT, 24)


def test_gemma3_positions_count_from_one_in_transformers_js_up_to_the_last_table_row(capsys, tokenizer_dir, tmp_path):
    """transformers.js feeds Gemma 3 position_ids from 1; the graph subtracts 1, so a sequence fills the whole
    rotary table (--max-seq-len 64: the 64th token, position_ids 64, reads row 63) and matches transformers."""
    model = sensitive(tiny_dense("gemma3_text"))
    model_dir = save_with_tokenizer(model, tmp_path / "gemma3", tokenizer_dir)
    out = tmp_path / "web"
    code, _, err = run_cli(capsys, "--target", "web", "--model", model_dir, "--max-seq-len", 64, "--threads", 2,
                           "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    exact(manifest["parity"])
    assert manifest["web"]["max_positions"] == manifest["context_length"] == 64
    assert any(n.op_type == "Sub" and n.input[0] == "position_ids" for n in graph_of(out).node)
    ids = [(i * 7919) % 49000 + 10 for i in range(64)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    from runtimes.base import load_runner
    with load_runner(out, threads=1) as runner:
        np.testing.assert_allclose(runner.prefill(ids[:63]), ref[62], rtol=0, atol=1e-4)
        np.testing.assert_allclose(runner.decode(ids[63]), ref[63], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant,quant", [("llama", "q4"), ("lfuc-routed-k1-qwen3", "q4"), ("lfuc-gated-k2", "q8"),
                                           ("lfuc-routed-k1", "fp16")])
def test_lossy_quants_pass_their_floor(capsys, models, tmp_path, monkeypatch, variant, quant):
    import converters.onnx_quant as onnx_quant
    from converters.web import WebExporter

    # q8: the tiny widths (32, 48) split into blocks of input channels, as a real model's (576, 1536) do at 128
    monkeypatch.setattr(onnx_quant, "ACTIVATION_BLOCK", 16)
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", models(variant), out, quant=quant)
    graph = check_layout(out, manifest, quant)
    from converters.parity import text_gate_failure

    parity = manifest["parity"]
    for checked in (parity, parity["other_runtimes"]["web-wasm"]):
        assert text_gate_failure(checked["text"], WebExporter.tolerances[quant]) is None
    ops = {n.op_type for n in graph.node}
    if quant == "q4":
        bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {4}
    elif quant == "q8":
        check_dynamic_int8(graph)
    else:
        assert "Cast" in ops and "MatMulNBits" not in ops
    got = node_generate(out, PROMPT, 16)
    assert len(got["tokens"]) == 16 and got["settings"]["dtype"] == quant


def check_dynamic_int8(graph):
    """q8 is DynamicQuantizeMatMul over int8 weights (onnxruntime-web's WebAssembly build runs 8-bit MatMulNBits
    several times slower): every projection, expert and the LM head, in blocks of input channels; only the
    routers and the shared expert's gate stay fp32 MatMuls; the embedding is gathered from the head's int8 bytes.
    The experts route by gather: each runs its DynamicQuantizeMatMuls on the rows routed to it only."""
    nodes = graph.node
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert not [n for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "If")]
    dqmm = [n for n in nodes if n.op_type == "DynamicQuantizeMatMul"]
    assert dqmm and all(n.domain == "com.microsoft" and n.input[1] in int8 for n in dqmm)
    assert {n.name for n in nodes if n.op_type == "MatMul"} <= {n.name for n in nodes
                                                                if n.name.endswith((".router", ".shared_gate"))}
    blocked = {n.output[0] for n in nodes if n.op_type == "Sum"}
    head = next(n for n in graph.node if "logits" in n.output)
    assert head.op_type == "Sum" and blocked and len(dqmm) > 2 * len(blocked)   # split into blocks, the head too
    lookups = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert lookups and {n.input[0] for n in lookups} <= {i for n in dqmm for i in n.input}


def test_num_logits_to_keep_runs_the_lm_head_on_the_last_positions_only(capsys, models, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", models("qwen3"), out)
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    w = manifest["web"]
    feed = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64),
            "position_ids": np.arange(len(PROMPT), dtype=np.int64)[None],
            **{f"past_key_values.{i}.{kv}": np.zeros((1, w["kv_heads"], 0, w["kv_head_dim"]), np.float32)
               for i in range(w["num_layers"]) for kv in ("key", "value")}}
    every = session.run(["logits"], {**feed, "num_logits_to_keep": np.array(0, np.int64)})[0]
    last2 = session.run(["logits"], {**feed, "num_logits_to_keep": np.array(2, np.int64)})[0]
    assert every.shape[1] == len(PROMPT) and last2.shape[1] == 2
    np.testing.assert_allclose(last2, every[:, -2:], rtol=0, atol=1e-5)


def test_experts_past_the_graph_file_limit_route_by_gather_with_their_weights_in_the_data_files(
        capsys, models, tmp_path, monkeypatch):
    """`switch` keeps the experts' weights in the graph file; where that would pass GRAPH_FILE_BYTES the export
    routes by `gather` instead (each expert's MatMuls behind a ScatterND), and is exact all the same."""
    import converters.web as web

    model = hf_model(models("lfuc-routed-k1"))
    experts = len(moe_layers(model)) * model.config.num_experts
    limit = 64 << 10           # the tiny model's graph file: ~110 KiB with its experts in it, ~26 KiB without
    monkeypatch.setattr(web, "GRAPH_FILE_BYTES", limit)
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", models("lfuc-routed-k1"), out)
    graph = graph_of(out)
    assert manifest["web"]["moe_lowering"] == "gather" and not expert_branches(graph)
    assert len([n for n in graph.node if n.op_type == "ScatterND"]) == experts
    assert (out / "onnx" / "model.onnx").stat().st_size <= limit
    exact(manifest["parity"])


def test_large_weights_split_into_chunks_transformers_js_loads(capsys, tmp_path, tokenizer_dir, monkeypatch):
    """Past CHUNK_BYTES the weights go on into model.onnx_data_1, _2, ... (a browser holds each in one buffer).
    An untied LM head: the embedding and the head (6 MiB each) cannot share a 7 MiB file."""
    import converters.web as web

    monkeypatch.setattr(web, "CHUNK_BYTES", 7 << 20)
    model_dir = save_with_tokenizer(sensitive(tiny_dense("llama", tie_word_embeddings=False)), tmp_path / "m",
                                    tokenizer_dir)
    out = tmp_path / "web"
    manifest = export_with_cli(capsys, "web", model_dir, out)
    data = manifest["files"][1:-2]                       # then index.html and page.js
    assert data == ["onnx/model.onnx_data", *(f"onnx/model.onnx_data_{i}" for i in range(1, len(data)))]
    assert len(data) >= 2 and all((out / f).stat().st_size <= 7 << 20 for f in data)
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {"model.onnx": len(data)}
    exact(manifest["parity"])                            # both onnxruntime-node and onnxruntime-web load the chunks


@pytest.mark.parametrize("quant", ["int4", "q4f16", "q4_0"])
def test_a_quant_the_web_target_does_not_offer_exits_2_and_writes_nothing(capsys, models, tmp_path, quant):
    code, _, err = run_cli(capsys, "--target", "web", "--model", models("llama"), "--quant", quant,
                           "--out", tmp_path / "o")
    assert_user_error(code, err, f"--quant {quant!r} is not offered for --target web", "fp32, fp16, q8, q4")
    assert not (tmp_path / "o").exists()


def test_without_node_or_for_a_family_transformers_js_lacks_exits_2_before_exporting(capsys, models, tmp_path,
                                                                                       monkeypatch):
    import runtimes.transformersjs as tjs

    olmoe = tmp_path / "olmoe"
    shutil.copytree(models("llama"), olmoe)
    config = json.loads((olmoe / "config.json").read_text())
    (olmoe / "config.json").write_text(json.dumps({**config, "model_type": "olmoe"}))
    code, _, err = run_cli(capsys, "--target", "web", "--model", olmoe, "--out", tmp_path / "o")
    assert_user_error(code, err, "the web target exports llama, qwen2", "not 'olmoe'")
    monkeypatch.setattr(tjs.shutil, "which", lambda name: None)
    code, _, err = run_cli(capsys, "--target", "web", "--model", models("llama"), "--out", tmp_path / "o")
    assert_user_error(code, err, "needs Node.js")
    assert not (tmp_path / "o").exists()


def test_weights_beyond_webassembly_memory_are_refused_before_export(capsys, tmp_path, tokenizer_dir):
    """A 70B-sized config: refused naming WebAssembly's 4 GiB, before any weight is read (it has none)."""
    big = tmp_path / "big"
    big.mkdir()
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, big / f.name)
    config = tiny_dense("llama").config.to_dict()
    config.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256)
    (big / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "--target", "web", "--model", big, "--quant", "q4", "--out", tmp_path / "o")
    assert_user_error(code, err, "WebAssembly's memory is 4 GiB", "too large for the web")
    assert not (tmp_path / "o").exists()


def test_runner_state_generate_and_bench_commands(capsys, models, tmp_path):
    from d2m_export.errors import UserError
    from runtimes.base import load_runner

    out = tmp_path / "web"
    export_with_cli(capsys, "web", models("lfuc-routed-k1"), out)
    with load_runner(out, threads=1, n_ctx=len(PROMPT) + 3) as runner:
        first = runner.prefill(PROMPT)
        steps = [runner.decode(7), runner.decode(8)]
        np.testing.assert_array_equal(first, runner.prefill(PROMPT))       # a new sequence starts from scratch
        np.testing.assert_array_equal(steps, [runner.decode(7), runner.decode(8)])
        runner.decode(9)
        with pytest.raises(UserError, match="exceeds n_ctx"):
            runner.decode(10)
    with load_runner(out, threads=1, runtime="web-wasm") as runner:        # the WebAssembly build: the same logits
        np.testing.assert_allclose(runner.prefill(PROMPT), first, rtol=0, atol=1e-4)
    code, _, err = run_cli(capsys, "bench", out, "--runtime", "web-wasm", "--prompt-tokens", 16, "--new-tokens", 8,
                           "--repeats", 1, "--out", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["target"] == "web" and result["runtime"] == "web-wasm" and result["decode_tokens_per_s"] > 0
    assert result["runtime_settings"]["runtime"].endswith("(wasm)") and result["runtime_settings"]["node_peak_rss_mb"] > 0
    code, stdout, err = run_cli(capsys, "generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 8)
    assert code == 0 and stdout.startswith("Once upon a time"), err
    code, _, err = run_cli(capsys, "generate", out, "--runtime", "onnx", "--prompt", "Hi")
    assert code == 2 and "--runtime onnx does not run web exports" in err


def test_node_script_reports_a_folder_it_cannot_load(tmp_path):
    res = subprocess.run(["node", str(SCRIPT), "generate", str(tmp_path), "--ids", "1,2"], capture_output=True,
                         text=True, timeout=120, cwd=WEB_DIR)
    assert res.returncode == 1 and res.stderr.startswith("d2m_web: ") and res.stderr.count("\n") == 1
    assert not res.stdout


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_quantized_embedding_lookup_in_standard_ops_equals_gather_block_quantized(quant):
    """onnxruntime-web's browser build has no GatherBlockQuantized: the web target looks the rows up with
    Gather and arithmetic over the same bytes. Both, run in onnxruntime, give the same rows."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from converters.onnx_ops import MS, Graph
    from converters.onnx_quant import NBitsLinears

    embed = np.random.default_rng(0).normal(size=(50, 96)).astype(np.float32)
    ids = np.array([[3, 49, 0, 7], [7, 7, 1, 22]], np.int64)
    rows = []
    for plain in (False, True):
        g = Graph()
        hidden, _ = NBitsLinears(g, quant, plain_embedding=plain).embedding_and_head(embed, None, "input_ids")
        assert plain == ("GatherBlockQuantized" not in {n.op_type for n in g.nodes})
        graph = helper.make_graph(g.nodes, "embed", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                  ["b", "s"])],
                                  [helper.make_tensor_value_info(hidden, TensorProto.FLOAT, None)], g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rows.append(session.run(None, {"input_ids": ids})[0])
    assert rows[0].shape == (2, 4, 96)
    np.testing.assert_array_equal(rows[1], rows[0])
    assert np.abs(rows[1] - embed[ids]).max() < (0.1 if quant == "int8" else 1.0)    # and they are the embedding


@pytest.mark.parametrize("tied", [True, False])
def test_web_q8_weights_embedding_and_blocks_in_onnxruntime(tied):
    """q8's pieces run in onnxruntime: weights quantized per output channel as onnxruntime's own
    `quantize_dynamic(per_channel=True, weight_type=QInt8)` quantizes them; the embedding looked up from the
    int8 bytes is exactly the dequantized table; a 300-wide input split into blocks of at most 128 channels
    gives x @ W.T within the int8 error."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    from onnxruntime.quantization.quant_utils import quantize_data

    from converters.onnx_ops import MS, Graph
    from converters.onnx_quant import DynamicInt8Linears, quantize_columns

    rng = np.random.default_rng(0)
    embed, w = rng.normal(size=(50, 300)).astype(np.float32), rng.normal(size=(40, 300)).astype(np.float32)
    q, scale = quantize_columns(embed)
    for row in (0, 17):
        zero, lib_scale, lib_q = quantize_data(embed[row], TensorProto.INT8, True)
        assert zero == 0 and np.isclose(lib_scale, scale[row]) and np.array_equal(lib_q, q[row])
    g = Graph()
    lin = DynamicInt8Linears(g)
    hidden, head = lin.embedding_and_head(embed, None if tied else w, "input_ids")
    y = lin.matmul("x", w, "proj")
    head(hidden)
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in g.nodes) == 6 and "GatherBlockQuantized" not in \
        {n.op_type for n in g.nodes}                     # 3 blocks (100 channels each) for the projection and the head
    graph = helper.make_graph(g.nodes, "q8", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                                              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 300])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (hidden, y)],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids, x = np.array([[3, 49, 0], [7, 7, 1]], np.int64), rng.normal(size=(2, 300)).astype(np.float32)
    rows, out = session.run(None, {"input_ids": ids, "x": x})
    np.testing.assert_array_equal(rows, (q * scale[:, None])[ids])
    want = x @ w.T
    assert np.abs(out - want).max() < 0.02 * np.abs(want).max()
