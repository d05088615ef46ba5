"""The command line on tiny models: outputs, and one-line errors with exit code 2 for bad input."""
from __future__ import annotations

import json

import pytest

from conftest import assert_user_error
from d2m_export.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_json_and_heatmap(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "analysis"
    code, stdout, err = run(capsys, "analyze", "--model", tiny_model_dir, "--calib-tokens", 256, "--out", out)
    assert code == 0, err
    data = json.loads((out / "similarity.json").read_text())
    assert {"model", "num_layers", "calibration_tokens", "blocks"} <= data.keys()
    assert data["num_layers"] == 6 and data["calibration_tokens"] == 256
    assert len(data["blocks"]) == 6 * 7 // 2
    b = data["blocks"][0]
    assert set(b) == {"start", "length", "angular_distance", "mlp_input_cos"}
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["lfuc", "prune", "upcycle"])
def test_convert_by_ratio_writes_loadable_checkpoint(capsys, tiny_model_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    ratio = [] if method == "upcycle" else ["--target-active-ratio", 0.995]
    code, stdout, err = run(capsys, "convert", "--model", tiny_model_dir, "--method", method, *ratio,
                            "--calib-tokens", 256, "--out", out)
    assert code == 0, err
    plan = json.loads((out / "d2m_plan.json").read_text())
    assert plan["method"] == method and plan["base_model"] == str(tiny_model_dir)
    if method != "upcycle":
        assert plan["params"]["active_ratio"] <= 0.995 and plan["plan"]["blocks"]
    # healed by default, every method, with the default budget, and said so
    assert plan["heal"] == {"healed": True, "stage": "convert", "budget": {"calib_tokens": 8192, "steps": 150}}
    assert plan["healing"]["blocks"] and "healed (convert heals by default" in stdout
    AutoModelForCausalLM.from_pretrained(out)


def test_convert_with_plan_file_and_calibrated_router(capsys, tiny_model_dir, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("blocks:\n  - {host: 1, donors: [2, 3]}\n")
    out = tmp_path / "fused"
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--plan", plan, "--router-init", "calibrated",
                       "--calib-tokens", 256, "--no-heal", "--out", out)
    assert code == 0, err
    record = json.loads((out / "d2m_plan.json").read_text())
    assert record["plan"]["blocks"] == [{"host": 1, "donors": [2, 3]}]
    assert record["plan"]["options"]["router_init"] == "calibrated"


def test_convert_heals_by_default_and_no_heal_skips_it(capsys, tmp_path, tokenizer_dir):
    """The default and --heal heal alike (here on a small budget, given without --heal); --no-heal writes
    the conversion as it is. d2m_plan.json's `heal` and the output say which."""
    import torch
    from safetensors.torch import load_file

    from conftest import save_with_tokenizer, tiny_dense

    dense = save_with_tokenizer(tiny_dense("llama"), tmp_path / "dense", tokenizer_dir)
    plan = tmp_path / "plan.yaml"
    plan.write_text("blocks:\n  - {host: 1, donors: [2, 3]}\n")
    budget = ["--heal-tokens", 1024, "--heal-steps", 2]
    runs = {"default": budget, "heal": ["--heal", *budget], "no-heal": ["--no-heal"]}
    stdout, record, weights = {}, {}, {}
    for name, flags in runs.items():
        code, stdout[name], err = run(capsys, "convert", "--model", dense, "--plan", plan, "--calib-tokens", 256,
                                      *flags, "--out", tmp_path / name)
        assert code == 0, err
        record[name] = json.loads((tmp_path / name / "d2m_plan.json").read_text())
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    for name in ("default", "heal"):
        assert record[name]["heal"] == {"healed": True, "stage": "convert",
                                        "budget": {"calib_tokens": 1024, "steps": 2}}
        assert record[name]["healing"]["calibration_tokens"] == 1024
        assert "healed (convert heals by default; --no-heal skips it): budget 1024 calibration tokens, " \
               "2 distillation steps per block" in stdout[name]
    assert record["no-heal"]["heal"] == {"healed": False, "reason": "--no-heal"}
    assert "healing" not in record["no-heal"] and "  not healed: --no-heal" in stdout["no-heal"]
    assert "healed (" not in stdout["no-heal"]
    for key in ("base_model", "method", "plan", "params", "architecture", "dtype", "scores", "wall_s"):
        assert key in record["no-heal"] and key in record["default"]
    # --heal is the default spelt out; healing moves the fused layer's FFN and nothing else
    assert all(torch.equal(weights["heal"][k], weights["default"][k]) for k in weights["default"])
    moved = sorted(k for k in weights["default"] if not torch.equal(weights["default"][k], weights["no-heal"][k]))
    assert moved and all(k.startswith("model.layers.1.mlp.") for k in moved), moved


@pytest.mark.parametrize("flags, needles", [
    (["--no-heal", "--heal-tokens", 1024], ["--no-heal", "--heal-tokens"]),
    (["--no-heal", "--heal-steps", 3], ["--no-heal", "--heal-steps"]),
    (["--heal", "--no-heal"], ["--no-heal", "--heal"]),
])
def test_no_heal_with_a_heal_budget_is_a_usage_error(capsys, tmp_path, flags, needles):
    """Refused before anything is loaded (the model named here does not exist): one line, nothing written."""
    code, out, err = run(capsys, "convert", "--model", tmp_path / "no-model", *flags, "--out", tmp_path / "o")
    assert_user_error(code, err, *needles)
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert list(tmp_path.iterdir()) == []


def test_missing_model_dir(capsys, tmp_path):
    code, _, err = run(capsys, "analyze", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert_user_error(code, err, "not found")
    assert not (tmp_path / "o").exists()


def test_corrupt_model_dir(capsys, tiny_model_dir, tmp_path):
    (tiny_model_dir / "config.json").write_text("{not json")
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--out", tmp_path / "o")
    assert_user_error(code, err, "corrupt")
    assert not (tmp_path / "o").exists()


def test_corrupt_weights(capsys, tiny_model_dir, tmp_path):
    (tiny_model_dir / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--out", tmp_path / "o")
    assert_user_error(code, err, "cannot load")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(capsys, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run(capsys, "eval", "--model", d, "--out", tmp_path / "e.json")
    assert_user_error(code, err, "unsupported architecture 'gpt2'", "llama", "qwen2")


@pytest.mark.parametrize("plan_text, needle", [
    ("blocks:\n  - {host: 4, donors: [5, 6]}\n", "layer 6"),
    ("blocks:\n  - {host: 1, donors: [2, 3]}\n  - {host: 3, donors: [4]}\n", "overlap"),
    ("blocks:\n  - {host: 1, donors: [3]}\n", "right after the host"),
    ("blocks: [", "not valid"),
    # found by tests/test_properties.py:
    (b"\x80", "not valid"),                                        # not UTF-8 (was a traceback)
    ("{}", "no 'blocks' list"),                                     # was accepted as an empty plan
    ("blocks:\n  - {host: 1, donor: [2]}\n", "malformed"),          # a misspelt key was ignored
    ("blocks: [[1, true]]\n", "layers are integers"),
    ("blocks: [{host: 1, donors: [2]}]\noptions: {top_k: x}\n", "--top-k must be an integer"),
    ("blocks: [{host: 1, donors: [2]}]\noptions: {alpha: .nan}\n", "--alpha must be a finite number"),
    ("blocks: [{host: 1, donors: [2]}]\nplan: 3\n", "'plan' is not a mapping"),
])
def test_bad_plans(capsys, tiny_model_dir, tmp_path, plan_text, needle):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(plan_text if isinstance(plan_text, bytes) else plan_text.encode())
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--plan", plan, "--out", tmp_path / "o")
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_unknown_task(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--tasks", "arc_easy", "no_such_task",
                       "--out", tmp_path / "e.json")
    assert_user_error(code, err, "no_such_task", "arc_easy")
    assert not (tmp_path / "e.json").exists()


def test_tasks_take_commas_and_none_means_perplexity_only(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--tasks", "none", "--ppl-tokens", 1024,
                       "--out", tmp_path / "ppl.json")
    assert code == 0, err
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["tasks"] == {} and result["perplexity"]["value"] > 1
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--tasks", "arc_easy,piqa", "--limit", 2,
                       "--ppl-tokens", 1024, "--out", tmp_path / "two.json")
    assert code == 0, err
    assert set(json.loads((tmp_path / "two.json").read_text())["tasks"]) == {"arc_easy", "piqa"}
    for bad in (["none", "piqa"], ["arc_easy,no_such_task"], [","]):
        code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--tasks", *bad, "--out", tmp_path / "bad.json")
        assert code == 2 and err.strip().startswith("d2m-export: error:") and not (tmp_path / "bad.json").exists()


def test_output_that_is_not_ours_is_left_alone(capsys, tiny_model_dir, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--out", theirs)
    assert_user_error(code, err, "not written by d2m-export")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    their_file = tmp_path / "e.json"
    their_file.write_text('{"mine": true}')
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--out", their_file)
    assert_user_error(code, err, "not written by d2m-export")
    assert their_file.read_text() == '{"mine": true}'


def test_rerun_replaces_our_own_output(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "fused"
    for _ in range(2):
        code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--target-active-ratio", 0.995,
                           "--calib-tokens", 256, "--no-heal", "--out", out)
        assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fused")]


def test_unreachable_ratio(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--target-active-ratio", 0.05,
                       "--calib-tokens", 256, "--out", tmp_path / "o")
    assert_user_error(code, err, "cannot reach")
    assert not (tmp_path / "o").exists()


def test_convert_by_latency_budget_meets_it_with_least_fusion(capsys, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from d2m_export.devices.profiles import load_profile
    from d2m_export.devices.roofline import decode_ms

    pi5 = load_profile("raspberry-pi-5")
    dense_ms = decode_ms(AutoConfig.from_pretrained(tiny_model_dir), pi5, "q8_0", 256)
    budget = round(0.995 * dense_ms, 6)
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "convert", "--model", tiny_model_dir, "--latency-budget-ms", budget,
                            "--device", "raspberry-pi-5", "--precision", "q8_0", "--context", 256,
                            "--calib-tokens", 256, "--no-heal", "--out", out)
    assert code == 0, err
    record = json.loads((out / "d2m_plan.json").read_text())
    lat = record["latency"]
    assert lat["device"] == "raspberry-pi-5" and lat["dense_ms"] == pytest.approx(dense_ms, rel=1e-3)
    assert lat["predicted_ms"] <= budget < lat["dense_ms"]
    assert decode_ms(AutoConfig.from_pretrained(out), pi5, "q8_0", 256) == pytest.approx(lat["predicted_ms"], rel=1e-3)
    # A looser budget never needs more fusion.
    blocks = record["plan"]["blocks"]
    assert blocks and "ms/token" in stdout
    if len(blocks) > 1:
        code, _, err = run(capsys, "convert", "--model", tiny_model_dir, "--latency-budget-ms", lat["predicted_ms"] * 1.2,
                           "--device", "raspberry-pi-5", "--precision", "q8_0", "--context", 256,
                           "--calib-tokens", 256, "--no-heal", "--out", tmp_path / "looser")
        assert code == 0, err
        assert len(json.loads((tmp_path / "looser" / "d2m_plan.json").read_text())["plan"]["blocks"]) <= len(blocks)


@pytest.mark.parametrize("argv, needle", [
    (["--latency-budget-ms", 1e-6, "--device", "raspberry-pi-5"], "cannot meet"),
    (["--latency-budget-ms", 1e6, "--device", "raspberry-pi-5"], "already meets"),
    (["--latency-budget-ms", 1.0], "needs --device"),
    (["--latency-budget-ms", 1.0, "--device", "toaster"], "not found"),
    (["--latency-budget-ms", 1.0, "--device", "raspberry-pi-5", "--precision", "int3"], "--precision"),
    (["--latency-budget-ms", 1.0, "--device", "host", "--runtime", "coreml"], "no measured efficiency"),
    (["--device", "raspberry-pi-5"], "--device goes with"),
])
def test_latency_budget_bad_input(capsys, tiny_model_dir, tmp_path, argv, needle):
    code, _, err = run(capsys, "convert", "--model", tiny_model_dir, *argv, "--calib-tokens", 256,
                       "--out", tmp_path / "o")
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["train", "--tokens", "-5"], "--tokens must be at least 1, not -5"),
    (["convert", "--target-active-ratio", "1.5"], "--target-active-ratio must be in (0, 1], not 1.5"),
    (["convert", "--target-active-ratio", "nan"], "--target-active-ratio expected a finite number"),
    (["convert", "--top-k", "0"], "--top-k must be at least 1"),
    (["heal", "--calib-tokens", "0"], "--calib-tokens must be at least 512 (one window to fit, one held out)"),
    # found by tests/test_properties.py (were errors about a "window" after the model had loaded):
    (["convert", "--calib-tokens", "64"], "--calib-tokens must be at least 256 (one calibration window)"),
    (["eval", "--ppl-tokens", "256"], "--ppl-tokens must be at least 512 (one perplexity window)"),
    (["train", "--seq-len=--"], "--seq-len expected a value"),     # argparse dropped "--" and kept the default
    (["train", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
    (["train", "--lr=-1e-3"], "--lr must be positive, not -0.001"),
    (["eval", "--limit", "ten"], "--limit expected an integer, not 'ten'"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_numeric_flags_are_checked_before_anything_is_loaded(capsys, tmp_path, argv, needle):
    """The model named here does not exist: the flag's error must come first, and nothing is written."""
    command, *flags = argv
    where = [tmp_path / "export"] if command == "bench" else ["--model", tmp_path / "no-model"]
    code, _, err = run(capsys, command, *where, *flags, "--out", tmp_path / "out")
    assert_user_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []
