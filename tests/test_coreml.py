"""Core ML export, verified where Core ML cannot run (Linux).

- The lowering (`converters/coreml_module.py`): the traced module reproduces transformers' greedy
  tokens exactly in fp32 — dense Llama/Qwen2, LF-UC Qwen2MoE (shared/routed host, top-1/top-2, a
  trained shared-expert gate) with random routers, and Mixtral.
- The saved program: states, inputs, outputs, every MoE layer with all its experts; the checker
  fails programs that silently lost experts or the KV-cache state (both converted for real).
- int8/int4: every weight matrix stored compressed, experts included; the package shrinks.
- Bad input exits 2 and writes nothing; bench/generate exit 2 on Linux ("needs macOS").
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_dense
from d2m_export.cli import main
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

ct = pytest.importorskip("coremltools")

from converters.coreml import PACKAGE, compress, convert, free_greedy, graph_digest, trace  # noqa: E402
from converters.coreml_module import LoweredDecoder, StableRMSNorm, TorchRunner  # noqa: E402
from converters.coreml_program import expected_structure, read_and_check, read_program, stored_weights  # noqa: E402
from converters.parity import reference_greedy, runtime_forced  # noqa: E402

BLOCKS = [Block(1, [2, 3]), Block(4, [5])]      # 6 layers -> 3: dense, MoE, MoE
PROMPT = [504, 3459, 8089, 12480, 690, 260, 23790, 2767, 30]
SEQ = 64


def lfuc(base: str = "llama", host_mode: str = "shared", top_k: int = 2, gated: bool = False, **overrides):
    experts = 3 if host_mode == "shared" else 4
    plan = Plan("lfuc", 6, BLOCKS, Options(host_mode=host_mode, top_k=top_k, num_experts=experts, router_init="zero"))
    moe = get_method("lfuc").build(tiny_dense(base, **overrides), plan)
    g = torch.Generator().manual_seed(top_k)
    with torch.no_grad():       # a random router: different tokens take different experts
        for layer in moe.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g))
                if gated:
                    layer.mlp.shared_expert_gate.weight.copy_(
                        0.5 * torch.randn(layer.mlp.shared_expert_gate.weight.shape, generator=g))
    return moe.eval()


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(**{**TINY, "num_hidden_layers": 2}, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=None)
    return MixtralForCausalLM(cfg).eval()


BUILDERS = {
    "llama": lambda: tiny_dense("llama"),
    "qwen2": lambda: tiny_dense("qwen2"),
    "lfuc-shared-k1": lambda: lfuc(top_k=1),
    "lfuc-shared-k2": lambda: lfuc(top_k=2),
    "lfuc-routed-k2": lambda: lfuc(host_mode="routed", top_k=2),
    "lfuc-gated-k2": lambda: lfuc("qwen2", top_k=2, gated=True),
    "mixtral": mixtral,
}


def save(model, path, tokenizer_dir):
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


# --- the lowering, in PyTorch -----------------------------------------------------------------

@pytest.mark.parametrize("variant", list(BUILDERS))
def test_traced_lowered_module_reproduces_transformers_greedy_fp32(variant):
    model = BUILDERS[variant]()
    lowered = LoweredDecoder(model, SEQ).eval()
    traced = trace(lowered)          # traced at q=3, end=5: the prompt and decode steps run other sizes
    tokens, logits = reference_greedy(model, PROMPT, 32)
    runner = TorchRunner(traced, SEQ, lowered.reset)
    got = runtime_forced(runner, PROMPT, tokens)
    assert (got.argmax(-1) == np.array(tokens)).all()
    assert np.abs(got - logits).max() < 1e-4
    assert free_greedy(runner, PROMPT, 32) == tokens
    # a prompt fed in chunks (as the runner and the Swift loop do) reaches the same state
    runner.prefill(PROMPT[:4])
    assert np.abs(runner._run(PROMPT[4:]) - logits[0]).max() < 1e-4


def test_lean_fp16_overflow_check_answers_as_coremltools_does():
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from converters.coreml import finite_abs_max, lean_fp16_overflow_check

    def theirs(value):          # coremltools' own expression
        a = np.abs(np.expand_dims(value, 0))
        return float(np.max(a[np.where(a < 1e38)], initial=0.0))

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((300, 70)).astype(np.float32) * scale for scale in (1.0, 1e4, 1e5)]
    cases[0][3, 5], cases[1][7, 7] = -np.inf, np.nan      # the attention mask's -inf is not an overflow
    cases += [np.float32(65504.0), np.float32(-65505.0), np.array([np.inf, 3e38, -2.0], np.float32),
              np.zeros((0, 4), np.float32), np.full(10, np.nan, np.float32)]
    for value in cases:
        assert finite_abs_max(value, chunk=1000) == theirs(value)
    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    with lean_fp16_overflow_check():
        assert FP16ComputePrecision.__dict__["fp16_overflow"] is not original
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is original


def test_rms_norm_survives_fp16_massive_activations():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = torch.tensor([[22552.0, -3.0, 1.0, 0.5, -700.0, 2.0, 0.0, 10.0]])
    stable = StableRMSNorm(ref)
    torch.testing.assert_close(stable(x), ref(x), rtol=1e-6, atol=1e-6)
    half = StableRMSNorm(ref).half()(x.half())             # x² overflows fp16: the plain norm gives 0s
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), ref(x), rtol=1e-2, atol=1e-2)


# --- the saved program --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lfuc_dir(tmp_path_factory, tokenizer_dir):
    return save(lfuc(top_k=2, intermediate_size=64), tmp_path_factory.mktemp("coreml") / "tiny-lfuc", tokenizer_dir)


@pytest.fixture(scope="module")
def lfuc_export(lfuc_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml-out") / "fp16"
    assert main(["--target", "coreml", "--model", str(lfuc_dir), "--max-seq-len", str(SEQ), "--out", str(out)]) == 0
    return out


def test_export_has_states_inputs_outputs_and_experts(lfuc_export):
    manifest = json.loads((lfuc_export / "manifest.json").read_text())
    assert manifest["target"] == "coreml" and manifest["files"] == [PACKAGE] and manifest["quant"] == "fp16"
    info = manifest["coreml"]
    assert info["deployment_target"] == "iOS18" and info["max_seq_len"] == SEQ
    assert set(info["inputs"]) == {"input_ids", "causal_mask"} and list(info["outputs"]) == ["logits"]
    assert info["outputs"]["logits"]["shape"] == [1, TINY["vocab_size"]]
    assert info["states"] == {n: {"dtype": "fp16", "shape": [3, 1, 2, SEQ, 8]} for n in ("key_cache", "value_cache")}
    assert info["moe_layers"] == {"1": 3, "2": 3}
    # read back independently of the exporter's own report
    spec = ct.utils.load_spec(str(lfuc_export / PACKAGE))
    assert [s.name for s in spec.description.state] == ["key_cache", "value_cache"]
    assert spec.specificationVersion >= 9
    # parity: the lowered module, not Core ML, and said so
    parity = manifest["parity"]
    assert parity["checked_on"] == "pytorch-lowered-module"
    assert parity["greedy_match"] == parity["greedy_total"] >= 64 and parity["free_running_greedy_identical"]
    assert all(p["greedy_total"] >= 32 for p in parity["prompts"])
    v = manifest["verification"]
    assert v["on_device"] is False and v["checked"] and any("macOS" in s for s in v["not_checked"])
    assert v["stored_weights"]["greedy_match"] == v["stored_weights"]["greedy_total"]
    assert v["program"]["state_writes"] == {"key_cache": 3, "value_cache": 3}


def test_checker_fails_programs_without_experts_or_state(lfuc_dir, tmp_path):
    """Converted for real: one MoE layer loses an expert, another all of them; a program without states."""
    from d2m_export.sources.models import load_model

    model, _, _ = load_model(lfuc_dir)
    expected = expected_structure(model.config, SEQ, "fp16")
    lowered = LoweredDecoder(model, SEQ).eval()
    moe1, layer2 = lowered.layers[1].moe, lowered.layers[2]
    moe1.gate_up_proj = torch.nn.Parameter(moe1.gate_up_proj[:2].detach().clone())
    moe1.down_proj = torch.nn.Parameter(moe1.down_proj[:2].detach().clone())
    moe1.router = torch.nn.Parameter(moe1.router[:2].detach().clone())
    layer2.mlp, layer2.moe = layer2.moe.shared, None            # experts dropped: a dense MLP remains
    convert(trace(lowered), lowered).save(str(tmp_path / "broken.mlpackage"))
    _, problems = read_and_check(tmp_path / "broken.mlpackage", expected)
    assert any("MoE layer 1" in p and "2 experts, expected 3" in p for p in problems), problems
    assert any("MoE layer 2: no expert weights" in p for p in problems), problems

    lowered = LoweredDecoder(model, SEQ).eval()
    q, end = ct.RangeDim(1, SEQ, default=1), ct.RangeDim(1, SEQ, default=1)
    stateless = ct.convert(     # coremltools accepts this: the cache becomes constants, the writes vanish
        trace(lowered), inputs=[ct.TensorType(name="input_ids", shape=(1, q), dtype=np.int32),
                                ct.TensorType(name="causal_mask", shape=(1, 1, q, end), dtype=np.float32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)], minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", skip_model_load=True)
    stateless.save(str(tmp_path / "stateless.mlpackage"))
    _, problems = read_and_check(tmp_path / "stateless.mlpackage", expected)
    assert any("state 'key_cache' is missing" in p for p in problems), problems


def test_int8_int4_compress_every_weight_matrix_experts_included(lfuc_dir, lfuc_export, tmp_path):
    from d2m_export.sources.models import load_model

    model, _, _ = load_model(lfuc_dir)
    lowered = LoweredDecoder(model, SEQ).eval()
    keys = lowered.compressible()
    assert {"layers_1_moe_gate_up_proj", "layers_2_moe_down_proj", "embed_weight"} <= set(keys)
    fp16 = convert(trace(lowered), lowered)
    fp16_mb = read_program(lfuc_export / PACKAGE)["weight_file_mb"]
    originals = {k: t.detach().numpy() for k, t in lowered.tensors_by_key().items() if k in keys}
    # an uncompressed program does not pass as int4
    _, problems = read_and_check(lfuc_export / PACKAGE, expected_structure(model.config, SEQ, "int4", keys))
    assert any("layers_1_moe_gate_up_proj is not stored as int4" in p for p in problems), problems
    for quant, shrink, tol in (("int8", 0.6, 0.02), ("int4", 0.4, 0.3)):
        compressed, fallbacks = compress(fp16, quant, keys)
        path = tmp_path / f"{quant}.mlpackage"
        compressed.save(str(path))
        report, problems = read_and_check(path, expected_structure(model.config, SEQ, quant, keys))
        assert problems == [] and fallbacks == []
        assert report["compression"]["ops"]["constexpr_blockwise_shift_scale"] == len(keys)
        assert report["moe_layers"]["1"]["gate_up_proj"]["stored"] == quant
        assert report["moe_layers"]["2"]["down_proj"]["op"] == "constexpr_blockwise_shift_scale"
        assert report["weight_file_mb"] < shrink * fp16_mb
        # the stored weights decompress to the original experts, in order
        stored = stored_weights(path)
        for key in keys:
            w = originals[key]
            assert np.abs(stored[key].astype(np.float32) - w).max() <= tol * np.abs(w).max(), key


def test_int4_export_reloads_the_module_it_freed_and_checks_it_traces_the_same_graph(lfuc_dir, tmp_path):
    # the module goes while the program is compressed (memory) and comes back for parity: the
    # graph traced again must be the one converted, and parity runs on it as for fp16
    out = tmp_path / "int4"
    assert main(["--target", "coreml", "--model", str(lfuc_dir), "--quant", "int4", "--max-seq-len", str(SEQ),
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"] >= 64
    assert "reload for parity" in manifest["verification"]["export_wall_s"]
    assert manifest["coreml"]["compression"]["ops"]["constexpr_blockwise_shift_scale"] > 0
    a, b = lfuc(top_k=1), lfuc(top_k=2)
    la, lb = LoweredDecoder(a, SEQ).eval(), LoweredDecoder(b, SEQ).eval()
    assert graph_digest(trace(la)) == graph_digest(trace(la)) != graph_digest(trace(lb))


# --- command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--quant", "q4_0"], "is not offered for --target coreml"),
    (["--max-seq-len", "100000"], "above the model's context length"),
    (["--max-seq-len", "8"], "too short"),
])
def test_bad_input_exits_2_and_writes_nothing(lfuc_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["--target", "coreml", "--model", str(lfuc_dir), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_model_exits_2(tmp_path, tokenizer_dir, capsys):
    model_dir = save(tiny_dense("qwen2", use_sliding_window=True, sliding_window=16), tmp_path / "swa", tokenizer_dir)
    out = tmp_path / "out"
    assert main(["--target", "coreml", "--model", str(model_dir), "--out", str(out)]) == 2
    assert "sliding-window" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML predicts on macOS")
def test_bench_and_generate_need_macos(lfuc_export, tmp_path, capsys):
    assert main(["bench", str(lfuc_export), "--out", str(tmp_path / "bench.json")]) == 2
    assert "Core ML prediction needs macOS" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
    assert main(["generate", str(lfuc_export), "--prompt", "Hello"]) == 2
    captured = capsys.readouterr()
    assert "Core ML prediction needs macOS" in captured.err and captured.out == ""
