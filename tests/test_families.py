"""Families beyond Llama/Qwen2 through every stage on the command line: a tiny random Qwen3 (per-head
q/k norms) is analysed, converted (lfuc, prune, upcycle, lfuc with --heal), healed, evaluated,
trained, taken back to dense (moe2dense) and exported to every target with parity in its runtime.
The exactness identities are in test_surgery.py and test_moe2dense.py; llama.cpp's free-running
greedy decoding in test_gguf.py.
"""
from __future__ import annotations

import json

import pytest

from conftest import family_workspace, run_cli
from d2m_export.cli import main

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_dir):
    return family_workspace(tmp_path_factory.mktemp("qwen3"), "qwen3", tokenizer_dir)


def config(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("method, flags, model_type", [
    ("lfuc", ["--target-active-ratio", "0.9"], "qwen3_moe"),
    ("lfuc", ["--plan", "PLAN", "--host-mode", "shared", "--heal", "--heal-tokens", "1024", "--heal-steps", "2"],
     "qwen3_moe"),
    ("prune", ["--target-active-ratio", "0.9"], "qwen3"),
    ("upcycle", ["--num-experts", "2"], "qwen3_moe"),
])
def test_convert(capsys, qwen3, tmp_path, method, flags, model_type):
    flags = [str(qwen3["root"] / "plan.yaml") if f == "PLAN" else f for f in flags]
    code, out, err = run_cli(capsys, "convert", "--model", qwen3["dense"], "--method", method, *flags,
                             "--calib-tokens", 512, "--out", tmp_path / "out")
    assert code == 0, err
    cfg = config(tmp_path / "out")
    assert cfg["model_type"] == model_type
    if "--heal" in flags:
        assert "healed on 1024 calibration tokens" in out


def test_analyze_heal_eval_train_moe2dense_gguf(capsys, qwen3, tmp_path):
    dense, root = qwen3["dense"], qwen3["root"]
    code, _, err = run_cli(capsys, "analyze", "--model", dense, "--calib-tokens", 512, "--out", tmp_path / "an")
    assert code == 0, err
    lfuc = tmp_path / "lfuc"
    code, _, err = run_cli(capsys, "convert", "--model", dense, "--plan", root / "plan.yaml", "--calib-tokens", 512,
                           "--no-heal", "--out", lfuc)
    assert code == 0, err
    code, out, err = run_cli(capsys, "heal", "--model", lfuc, "--calib-tokens", 1024, "--steps", 2,
                             "--out", tmp_path / "healed")
    assert code == 0 and "1←[2, 3]" in out, err
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "healed", "--tasks", "piqa", "--limit", 2,
                           "--ppl-tokens", 1024, "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["value"] > 1
    code, _, err = run_cli(capsys, "train", "--model", lfuc, "--corpus", root / "corpus.txt", "--tokens", 256,
                           "--seq-len", 32, "--global-batch", 4, "--micro-batch", 2, "--out", tmp_path / "trained")
    assert code == 0, err
    assert config(tmp_path / "trained")["model_type"] == "qwen3_moe"
    code, _, err = run_cli(capsys, "convert", "--model", tmp_path / "trained", "--method", "moe2dense",
                           "--experts-kept", 1, "--calib-tokens", 512, "--out", tmp_path / "back")
    assert code == 0, err
    assert config(tmp_path / "back")["model_type"] == "qwen3"
    for model in (tmp_path / "healed", tmp_path / "back"):
        code, out, err = run_cli(capsys, "--target", "gguf", "--model", model, "--threads", 1,
                                 "--out", tmp_path / f"gguf-{model.name}")
        assert code == 0 and "greedy 64/64" in out, err


@pytest.fixture(scope="module")
def qwen3_lfuc(qwen3):
    """LF-UC with the shared host, which Qwen3-MoE holds folded into every expert."""
    out = qwen3["root"] / "lfuc-shared"
    code = main(
        ["convert", "--model", str(qwen3["dense"]), "--plan", str(qwen3["root"] / "plan.yaml"), "--host-mode",
         "shared", "--calib-tokens", "512", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("target, model", [("onnx", "dense"), ("onnx", "lfuc"), ("executorch", "lfuc"),
                                           ("coreml", "lfuc")])
def test_exports_match_transformers(capsys, qwen3, qwen3_lfuc, tmp_path, target, model):
    """q/k norms in each graph: fp32 (Core ML: its fp16 export, checked on Linux as the traced program)
    gives transformers' greedy tokens; the tiny 8-wide heads are padded to 16 in ONNX, so the padded
    head norm is exercised too. ONNX exports are also run in ONNX Runtime GenAI."""
    if target == "executorch":
        pytest.importorskip("executorch")
    if target == "coreml":
        pytest.importorskip("coremltools")
    src = qwen3["dense"] if model == "dense" else qwen3_lfuc
    code, out, err = run_cli(capsys, "--target", target, "--model", src, "--threads", 1, "--out", tmp_path / "x")
    assert code == 0 and "greedy 64/64" in out, err
    parity = json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] == 64 and parity["max_abs_logit_err"] < 1e-4
    if target == "onnx":
        genai = parity["other_runtimes"]["onnxruntime-genai"]
        assert genai["greedy_match"] == 64 and genai["max_abs_logit_err"] < 1e-4
