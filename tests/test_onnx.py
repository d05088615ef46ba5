"""ONNX export run in ONNX Runtime, checked against transformers independently (the graph the
exporter writes, each MoE lowering's among them: test_onnx_graph.py).

Tiny random models: dense Llama and Qwen2 (head size 8, which GroupQueryAttention only takes padded,
and 16, which it takes as is), and LF-UC Qwen2MoE conversions (shared and routed host, top-1 and
top-2, a zero and a non-zero shared-expert gate) whose routers are made random so that routing
matters (onnx_helpers.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_with_tokenizer, tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Options, Plan
from onnx_helpers import (BLOCKS, PROMPT, VARIANTS, export, hf_greedy, hf_model, models,  # noqa: F401
                          routed_experts, run, sensitive)                      # models: a fixture

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


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
