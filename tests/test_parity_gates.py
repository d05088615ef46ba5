"""The parity gates of lossy exports: top-1 agreement and mean KL against the fp32 reference on a fixed text.

One tiny LF-UC model whose two experts both run for every token (top-2 of 2: no routing decision can
flip, so quantization noise stays small next to an expert's share), weights at unit scale and the final
norm scaled down so that the next-token distributions are moderately peaked. Its int4 ONNX export
passes the int4 gate; the same file with one expert's quantization scales zeroed fails both its parts
(top-1 agreement where the reference is decisive, mean KL) in the real runtime. The greedy match is
reported for both and gates neither (the sound export matches 31 of 64 greedy tokens, below the old
floor of half).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli, save_with_tokenizer, tiny_dense
from converters.base import get_target
from converters.parity import (FIXED_TEXT, MIN_DECISIVE, TEXT_PREFILL, TEXT_WINDOW, check_parity, text_gate_failure,
                               text_windows)
from d2m_export.errors import ParityError
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan

pytest.importorskip("onnxruntime")


def build_two_expert_model(out, tokenizer_dir):
    g = torch.Generator().manual_seed(0)
    dense = tiny_dense("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (3.0 if "down_proj" in name else 1.0))
        dense.model.norm.weight.mul_(0.3)
    plan = Plan("lfuc", 4, [Block(1, [2])], Options(host_mode="routed", top_k=2, router_init="zero"))
    moe = get_method("lfuc").build(dense, plan)
    with torch.no_grad():
        moe.model.layers[1].mlp.gate.weight.copy_(torch.randn(moe.model.layers[1].mlp.gate.weight.shape, generator=g))
    return save_with_tokenizer(moe, out, tokenizer_dir)


@pytest.fixture(scope="module")
def two_expert_model(tmp_path_factory, tokenizer_dir):
    return build_two_expert_model(tmp_path_factory.mktemp("gates") / "lfuc", tokenizer_dir)


def zero_expert_scales(export_dir, expert: int) -> str:
    """Zero one expert's fc1 scales of the first QMoE node, in place in the external data file."""
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    qmoe = next(n for n in graph.graph.node if n.op_type == "QMoE")
    scales = next(t for t in graph.graph.initializer if t.name == qmoe.input[3])
    where = {e.key: e.value for e in scales.external_data}
    per_expert = int(where["length"]) // scales.dims[0]
    with open(export_dir / where["location"], "r+b") as f:
        f.seek(int(where["offset"]) + expert * per_expert)
        f.write(bytes(per_expert))
    return scales.name


def test_int4_gate_passes_a_sound_export_and_fails_one_with_an_expert_zeroed(capsys, tmp_path, two_expert_model):
    model_dir = two_expert_model
    out = tmp_path / "int4"
    code, _, err = run_cli(capsys, "--target", "onnx", "--model", model_dir, "--quant", "int4", "--threads", 1,
                           "--out", out)
    assert code == 0, err
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    tol = get_target("onnx").tolerances["int4"]
    assert parity["tolerance"] == tol.as_dict() and tol.min_greedy_fraction is None
    for text in (parity["text"], parity["other_runtimes"]["onnxruntime-genai"]["text"]):
        assert text["positions"] == sum(text["windows"]) - TEXT_PREFILL * len(text["windows"]) > 250
        assert text["decisive_positions"] >= MIN_DECISIVE and text_gate_failure(text, tol) is None
        assert text["top1_agreement"] < text["decisive_top1_agreement"] < 1 and 0 < text["mean_kl"]
        assert text["ppl_ratio"] > 0 and text["p99_kl"] <= text["max_kl"]
    assert 0 < parity["greedy_match"] < parity["greedy_total"]        # reported, not gated

    zero_expert_scales(out, expert=1)
    with pytest.raises(ParityError, match="onnx int4 in onnx: on the fixed text") as failed:
        check_parity(get_target("onnx"), model_dir, out, "int4", threads=1)
    assert "where the reference is decisive" in str(failed.value) and "mean KL" in str(failed.value)


def test_fp32_stays_exact_on_the_fixed_text(capsys, tmp_path, two_expert_model):
    code, _, err = run_cli(capsys, "--target", "onnx", "--model", two_expert_model, "--threads", 1,
                           "--out", tmp_path / "fp32")
    assert code == 0, err
    parity = json.loads((tmp_path / "fp32" / "manifest.json").read_text())["parity"]
    assert parity["tolerance"]["min_greedy_fraction"] == 1.0 and parity["greedy_match"] == parity["greedy_total"]
    assert parity["text"]["top1_agreement"] == 1.0 and parity["text"]["max_abs_logit_err"] < 1e-3
    assert abs(parity["text"]["mean_kl"]) < 1e-6 and parity["text"]["ppl_ratio"] == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("context", [64, 200, 4096])
def test_fixed_text_windows_fit_the_export_and_cover_the_text(tokenizer_dir, context):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(FIXED_TEXT)["input_ids"]
    windows = text_windows(ids, context)
    assert [t for w in windows for t in w] == ids
    assert max(map(len, windows)) <= min(context, TEXT_WINDOW) and min(map(len, windows)) > TEXT_PREFILL
    assert len(windows) == -(-len(ids) // min(context, TEXT_WINDOW))
    assert np.ptp([len(w) for w in windows]) <= 1
