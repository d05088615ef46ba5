"""Memory-lean conversion: weights written tensor by tensor in the source's dtype, bf16 calibration within
a stated tolerance of fp32, and a clear refusal when a model will not fit."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_user_error, run_cli, save_with_tokenizer, tiny_dense
from test_surgery import IDS, fused_reference, logits
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

BLOCKS = [Block(1, [2, 3]), Block(4, [5])]


def stored(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def write_plan(path, host_mode: str, experts: int):
    path.write_text(json.dumps({"blocks": [{"host": b.host, "donors": b.donors} for b in BLOCKS],
                                "options": {"router_init": "zero", "host_mode": host_mode, "top_k": experts,
                                            "num_experts": experts}}))
    return path


@pytest.mark.parametrize("method", ["lfuc", "prune", "upcycle"])
def test_written_checkpoint_equals_the_in_memory_conversion(tmp_path, tokenizer_dir, capsys, monkeypatch, method):
    """fp32 in, fp32 out: the tensor-by-tensor writer gives bit for bit what instantiating the converted
    model gives, in shards with an index when they exceed the shard size."""
    from d2m_export.sources import lazy_weights

    dense = tiny_dense("qwen2")
    src = save_with_tokenizer(dense, tmp_path / "dense", tokenizer_dir)
    plan = {"blocks": [] if method == "upcycle" else [{"host": 1, "donors": [2, 3]}],
            "options": {"router_init": "zero", **({"num_experts": 4, "top_k": 2} if method == "upcycle" else {})}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setattr(lazy_weights, "SHARD_BYTES", 2 << 20)      # several shards even for a tiny model
    code, _, err = run_cli(capsys, "convert", "--model", src, "--method", method, "--plan", tmp_path / "plan.json",
                           "--no-heal", "--out", tmp_path / "out")
    assert code == 0, err
    built = get_method(method).build(dense, Plan.from_dict(plan, method=method, num_layers=6))
    built.save_pretrained(tmp_path / "saved")
    expected, written = stored(tmp_path / "saved"), stored(tmp_path / "out")
    assert sorted(written) == sorted(expected)          # the names save_pretrained gives (experts one by one)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("host_mode", ["shared", "routed"])
def test_bf16_in_bf16_out_keeps_the_fusion_identity(tmp_path, tokenizer_dir, capsys, arch, host_mode):
    """A bf16 checkpoint converts to bf16 (half the bytes of fp32) and, run in bf16 as `eval` runs it,
    matches the fp32 reference of the same fusion within bf16 rounding: max |logit error| at most 2% of
    the largest logit, while the fusion itself moves logits by far more."""
    from d2m_export.sources.models import load_model

    dense = tiny_dense(arch).to(torch.bfloat16)
    src = save_with_tokenizer(dense, tmp_path / "dense", tokenizer_dir)
    experts = 2 if host_mode == "shared" else 3
    code, _, err = run_cli(capsys, "convert", "--model", src, "--plan", write_plan(tmp_path / "plan.json", host_mode, experts),
                           "--no-heal", "--out", tmp_path / "out")
    assert code == 0, err
    assert all(t.dtype == torch.bfloat16 for t in stored(tmp_path / "out").values())
    assert json.loads((tmp_path / "out" / "d2m_plan.json").read_text())["dtype"] == "bf16"
    fused, _, _ = load_model(tmp_path / "out")
    assert next(fused.parameters()).dtype == torch.bfloat16
    reference_dense = dense.float()
    reference = logits(fused_reference(reference_dense, BLOCKS))
    got = logits(fused).float()
    scale = reference.abs().max()
    assert (got - reference).abs().max() <= 0.02 * scale
    assert (reference - logits(reference_dense)).abs().max() > 10 * (got - reference).abs().max()


def test_dtype_flag_writes_what_it_names(tmp_path, tokenizer_dir, capsys):
    src = save_with_tokenizer(tiny_dense("llama").to(torch.bfloat16), tmp_path / "dense", tokenizer_dir)
    plan = write_plan(tmp_path / "plan.json", "shared", 2)
    for flag, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        code, _, err = run_cli(capsys, "convert", "--model", src, "--plan", plan, "--dtype", flag,
                               "--out", tmp_path / flag)
        assert code == 0, err
        assert {t.dtype for t in stored(tmp_path / flag).values()} == {dtype}
    code, _, err = run_cli(capsys, "convert", "--model", src, "--plan", plan, "--dtype", "int8",
                           "--out", tmp_path / "bad")
    assert_user_error(code, err, "--dtype", "int8")
    assert not (tmp_path / "bad").exists()


def test_bf16_calibration_agrees_with_fp32():
    """The stated tolerance for calibrating a bf16 model in bf16: on SmolLM2, every block's angular
    distance within 0.01 and MLP-input cosine within 0.01 of the fp32 calibration, and the same plan.
    Scoring batch by batch (streams dropped) gives the scores of keeping every stream."""
    from d2m_export.plan.analysis import block_table, score_blocks
    from d2m_export.plan.calibration import calibration_ids, collect
    from d2m_export.methods import get_method
    from d2m_export.sources.models import load_model
    from d2m_export.plan.planner import plan_by_ratio

    model, tokenizer, _ = load_model(None)
    ids = calibration_ids(tokenizer, 1024)
    fp32 = score_blocks(collect(model, ids, progress=False))
    streamed = collect(model, ids, progress=False, keep_streams=False)     # as analyze and convert score
    assert streamed.h == [] and len(streamed.r) == model.config.num_hidden_layers
    for a, b in zip(fp32, score_blocks(streamed)):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)
    bf16 = score_blocks(collect(model.to(torch.bfloat16), ids, progress=False))
    for a, b in zip(fp32, bf16):
        assert abs(a["angular_distance"] - b["angular_distance"]) <= 0.01, (a, b)
        assert abs(a["mlp_input_cos"] - b["mlp_input_cos"]) <= 0.01, (a, b)
    plans = [plan_by_ratio(get_method("lfuc"), model.config, block_table(s), 0.8, Options(), 4, -1.0).to_dict()
             for s in (fp32, bf16)]
    assert plans[0]["blocks"] == plans[1]["blocks"]


def test_a_model_too_large_for_memory_is_refused_before_work(tmp_path, tokenizer_dir, capsys, monkeypatch):
    src = save_with_tokenizer(tiny_dense("llama"), tmp_path / "dense", tokenizer_dir)
    monkeypatch.setenv("D2M_MEMORY_LIMIT_GB", "0.2")
    code, _, err = run_cli(capsys, "convert", "--model", src, "--out", tmp_path / "out")
    assert_user_error(code, err, "needs about", "GiB", "D2M_MEMORY_LIMIT_GB")
    assert not (tmp_path / "out").exists()
    for argv in (["--target", "gguf", "--model", src, "--out", tmp_path / "out"], ["eval", "--model", src],
                 ["analyze", "--model", src, "--out", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        assert_user_error(code, err, "needs about", "GiB is available")
        assert not (tmp_path / "out").exists()
    monkeypatch.setenv("D2M_MEMORY_LIMIT_GB", "lots")
    code, _, err = run_cli(capsys, "convert", "--model", src, "--out", tmp_path / "out")
    assert_user_error(code, err, "D2M_MEMORY_LIMIT_GB", "lots")


@pytest.mark.parametrize("target,quant", [("gguf", "f32"), ("onnx", "fp32"), ("executorch", "fp32")])
def test_a_bf16_conversion_exports_exactly(tmp_path, tokenizer_dir, capsys, target, quant):
    """bf16 in, bf16 out, then exported: the streamed GGUF/ONNX writers read the bf16 weights one tensor
    at a time, ExecuTorch upcasts one layer at a time, and the parity reference (fp32 arithmetic, one
    layer upcast at a time) matches the runtime on every greedy token."""
    from conftest import export_with_cli

    if target == "executorch":
        pytest.importorskip("executorch")
    from d2m_export.sources.models import load_fp32_compute

    src = save_with_tokenizer(tiny_dense("qwen2").to(torch.bfloat16), tmp_path / "dense", tokenizer_dir)
    code, _, err = run_cli(capsys, "convert", "--model", src, "--plan", write_plan(tmp_path / "plan.json", "routed", 3),
                           "--out", tmp_path / "lfuc")
    assert code == 0, err
    manifest = export_with_cli(capsys, target, tmp_path / "lfuc", tmp_path / "export", quant)
    parity = manifest["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] and parity["max_abs_logit_err"] <= 1e-2
    model, _, _ = load_fp32_compute(tmp_path / "lfuc")     # between steps the layers hold bf16 again
    assert {p.dtype for p in model.model.layers.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        model(input_ids=IDS)
    assert {p.dtype for p in model.model.layers.parameters()} == {torch.bfloat16}


def test_the_parity_reference_upcasts_once_only_when_the_fp32_copy_fits(tmp_path, tokenizer_dir, monkeypatch):
    from d2m_export.sources.memory import LIMIT_ENV, fp32_copy_fits
    from d2m_export.sources.models import load_fp32_compute

    src = save_with_tokenizer(tiny_dense("llama").to(torch.bfloat16), tmp_path / "dense", tokenizer_dir)
    assert fp32_copy_fits(src)
    whole = load_fp32_compute(src, whole=True)[0]
    assert {p.dtype for p in whole.parameters()} == {torch.float32}
    monkeypatch.setenv(LIMIT_ENV, "1")            # less than 1.5 x (fp32 copy + runtime): layer by layer
    assert not fp32_copy_fits(src)
    model = load_fp32_compute(src)[0]
    assert {p.dtype for p in model.model.layers.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, whole(input_ids=IDS).logits)


def test_gguf_quantizes_a_block_of_rows_at_a_time_with_the_same_bytes():
    import gguf
    import numpy as np

    from converters.gguf import Q, quantize_in_rows

    x = np.random.default_rng(0).standard_normal((3, 100, 256)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.F16):
        whole, rows = gguf.quants.quantize(x, qtype), quantize_in_rows(x, qtype, chunk_bytes=4096)
        assert whole.shape == rows.shape and whole.dtype == rows.dtype
        assert np.array_equal(whole.view(np.uint8), rows.view(np.uint8))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_header_pass_makes_no_large_tensor(arch):
    from converters.gguf import all_tensors
    from d2m_export.sources.lazy_weights import Float32Arrays, Float32Shapes

    model = tiny_dense(arch)
    state = Float32Arrays(model)
    made = list(all_tensors(state, model.config, arch))
    shapes = list(all_tensors(Float32Shapes(state, large=1000), model.config, arch))
    assert [(n, a.shape) for n, a in made] == [(n, a.shape) for n, a in shapes]
    large = [a for _, a in shapes if a.size > 1000]
    assert large and all(a.strides == (0,) * a.ndim for a in large)     # views of one zero, not arrays


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_loading_leaves_no_checkpoint_pages_counted_against_memory(tmp_path, tokenizer_dir):
    from d2m_export.sources.models import load_model

    moe = get_method("lfuc").build(tiny_dense("qwen2"), Plan("lfuc", 6, [Block(1, [2, 3])], Options(router_init="zero", top_k=1)))
    model_dir = save_with_tokenizer(moe, tmp_path / "moe", tokenizer_dir)   # experts stacked at load: copies
    files = {str(f.resolve()) for f in model_dir.glob("*.safetensors")}

    def resident_kb() -> int:
        total, current = 0, None
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if "-" in fields[0] and len(fields[0]) > 8 and ":" not in fields[0]:   # a mapping's header
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current in files:
                total += int(fields[1])
        return total

    model, _, _ = load_model(model_dir)
    assert resident_kb() == 0                    # the pages read while loading are handed back
    with torch.no_grad():
        model(input_ids=IDS)                     # tensors backed by the file read back in as used
    assert resident_kb() > 0
