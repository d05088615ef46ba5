"""Healing on the command line (`heal`, and `convert`, which heals by default), on a tiny random Llama
under the SmolLM2 tokenizer: a healed model loads with plain transformers, records what healing did (the
held-out errors are recomputed independently), and exports with parity; prune and upcycle heal
(upcycle: output unchanged, routers spread); moe2dense is not healed; bad input exits 2 and writes nothing.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_user_error, export_with_cli, run_cli, save_with_tokenizer, tiny_dense
from d2m_export.cli import main
from d2m_export.heal import WINDOW, HealConfig, calibration_windows
from d2m_export.heal.blocks import collect_blocks
from d2m_export.heal.fit import relative_error
from d2m_export.heal.layer import LayerRunner
from d2m_export.plan.loss_search import add_donor
from d2m_export.plan import Plan
from heal_helpers import changed, logits, read_record, tokenizer  # noqa: F401 (tokenizer: a fixture)

PLAN_YAML = "blocks:\n  - {host: 1, donors: [2, 3]}\n"


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def safetensors_state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_dir):
    """dense (tiny Llama); a: its LF-UC conversion by PLAN_YAML (default options but --no-heal); b: a healed
    by the heal stage (1024 tokens, 5 steps); a-shared, b-shared: the same with --host-mode shared."""
    root = tmp_path_factory.mktemp("heal")
    d = {"root": root, "dense": save_with_tokenizer(tiny_dense("llama"), root / "dense", tokenizer_dir),
         "plan": root / "plan.yaml"}
    d["plan"].write_text(PLAN_YAML)
    for suffix, extra in (("", []), ("-shared", ["--host-mode", "shared"])):
        a, b = d["a" + suffix], d["b" + suffix] = root / ("a" + suffix), root / ("b" + suffix)
        assert main(["convert", "--model", str(d["dense"]), "--plan", str(d["plan"]), "--calib-tokens", "256",
                     "--no-heal", *extra, "--out", str(a)]) == 0
        assert main(["heal", "--model", str(a), "--out", str(b), "--calib-tokens", "1024", "--steps", "5"]) == 0
    return d


def test_healed_model_loads_with_plain_transformers_and_records_healing(dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    a, b = dirs["a"], dirs["b"]
    healed = AutoModelForCausalLM.from_pretrained(b).eval()          # no remote code
    assert type(healed).__name__ == "Qwen2MoeForCausalLM" and healed.config.num_hidden_layers == 4
    assert torch.isfinite(logits(healed)).all()
    assert (b / ".d2m-export").is_file()

    rec, original = read_record(b), read_record(a)
    assert rec["plan"] == original["plan"] and rec["method"] == "lfuc" and rec["generator"] == "d2m-export"
    assert original["heal"] == {"healed": False, "reason": "--no-heal"}
    assert rec["heal"] == {"healed": True, "stage": "heal", "budget": {"calib_tokens": 1024, "steps": 5}}
    h = rec["healing"]
    assert h["calibration_tokens"] == 1024 and h["held_out_tokens"] == WINDOW and h["steps"] == 5
    assert h["calibration_corpora"] == ["calibration"] and h["healed_from"] == str(a)
    assert h["dense"] == str(dirs["dense"]) and h["wall_s"] > 0
    [block] = h["blocks"]
    assert (block["host"], block["donors"], block["layer"]) == (1, [2, 3], 1)
    e = block["error"]
    assert set(e) == {"before", "closed_form", "after"}
    assert e["after"] <= e["closed_form"] <= e["before"] and e["after"] < e["before"]
    assert block["distill"]["steps"] <= 5

    # only the fused layer's FFN differs from the conversion
    moved = changed(safetensors_state(a), safetensors_state(b))
    assert moved and all(k.startswith("model.layers.1.mlp.") for k in moved), moved

    # the recorded held-out errors, recomputed: the last calibration window, the dense block's targets
    dense = AutoModelForCausalLM.from_pretrained(dirs["dense"]).eval()
    plan = Plan.from_dict(rec["plan"], method="lfuc")
    [data] = collect_blocks(dense, plan, calibration_windows(tokenizer, HealConfig(calib_tokens=1024)),
                            progress=False)
    _, held = data.split(1)
    unhealed = AutoModelForCausalLM.from_pretrained(a).eval()
    assert relative_error(LayerRunner(unhealed, 1), held) == pytest.approx(e["before"], abs=2e-5)
    assert relative_error(LayerRunner(healed, 1), held) == pytest.approx(e["after"], abs=2e-5)


def test_healing_keeps_the_shared_expert_gate_zero(dirs):
    """LF-UC's shared expert sits behind a zero gate (sigmoid(0) = 0.5, a constant); exporters that
    have no input-dependent shared gate (GGUF) need it to stay zero."""
    assert read_record(dirs["a-shared"])["plan"]["options"]["host_mode"] == "shared"
    a, b = safetensors_state(dirs["a-shared"]), safetensors_state(dirs["b-shared"])
    key = "model.layers.1.mlp.shared_expert_gate.weight"
    assert torch.count_nonzero(a[key]) == 0
    assert torch.count_nonzero(b[key]) == 0, f"healing made {key} input-dependent: max |w| {b[key].abs().max()}"


@pytest.mark.parametrize("target, module, healed", [
    ("onnx", "onnxruntime", "b"), ("onnx", "onnxruntime", "b-shared"),
    ("gguf", "llama_cpp", "b"), ("gguf", "llama_cpp", "b-shared"),
    ("executorch", "executorch", "b"),
])
def test_healed_model_exports_with_parity(capsys, dirs, tmp_path, target, module, healed):
    pytest.importorskip(module)
    manifest = export_with_cli(capsys, target, dirs[healed], tmp_path / target)
    p = manifest["parity"]
    assert p["greedy_total"] >= 32 and p["greedy_match"] == p["greedy_total"]
    assert p["max_abs_logit_err"] < 1e-3


def test_closed_form_only_heal_exports_to_gguf(capsys, dirs, tmp_path):
    """Without distillation the shared-expert gate stays zero and GGUF takes the healed model."""
    pytest.importorskip("llama_cpp")
    healed = tmp_path / "closed-form"
    code, _, err = run_cli(capsys, "heal", "--model", dirs["a-shared"], "--out", healed, "--calib-tokens", 1024,
                           "--steps", 0)
    assert code == 0, err
    [block] = read_record(healed)["healing"]["blocks"]
    assert "distill" not in block and block["error"]["after"] == block["error"]["closed_form"]
    assert changed(safetensors_state(dirs["a-shared"]), safetensors_state(healed))
    manifest = export_with_cli(capsys, "gguf", healed, tmp_path / "gguf")
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]


def test_healed_model_converts_to_coreml(dirs, tmp_path):
    pytest.importorskip("coremltools")
    out = tmp_path / "coreml"
    assert main(["--target", "coreml", "--model", str(dirs["b"]), "--max-seq-len", "64", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    experts = json.loads((dirs["b"] / "config.json").read_text())["num_experts"]
    assert manifest["coreml"]["moe_layers"] == {"1": experts}
    p = manifest["parity"]
    assert p["checked_on"] == "pytorch-lowered-module"
    assert p["greedy_match"] == p["greedy_total"] >= 64 and p["free_running_greedy_identical"]


@pytest.mark.parametrize("heal_flag", [[], ["--heal"]])
def test_convert_with_heal_in_one_go(capsys, dirs, tmp_path, heal_flag):
    """convert heals by default; --heal, still accepted, says the same."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    code, stdout, err = run_cli(capsys, "convert", "--model", dirs["dense"], "--plan", dirs["plan"],
                                "--calib-tokens", 256, *heal_flag, "--heal-steps", 3, "--heal-tokens", 1024,
                                "--out", out)
    assert code == 0, err
    assert "healed on 1024 calibration tokens" in stdout
    assert read_record(out)["heal"] == {"healed": True, "stage": "convert", "budget": {"calib_tokens": 1024, "steps": 3}}
    h = read_record(out)["healing"]
    assert h["calibration_tokens"] == 1024 and h["steps"] == 3
    [block] = h["blocks"]
    assert block["distill"]["steps"] <= 3
    # the same conversion on the same windows as `heal` gave: the same starting and closed-form errors
    [separate] = read_record(dirs["b"])["healing"]["blocks"]
    assert block["error"]["before"] == pytest.approx(separate["error"]["before"], abs=2e-5)
    assert block["error"]["closed_form"] == pytest.approx(separate["error"]["closed_form"], abs=2e-5)
    assert block["error"]["after"] <= block["error"]["closed_form"] <= block["error"]["before"]
    assert changed(safetensors_state(dirs["a"]), safetensors_state(out))       # it did heal
    AutoModelForCausalLM.from_pretrained(out)


def test_prune_heals(capsys, dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = tmp_path / "pruned", tmp_path / "healed"
    code, _, err = run_cli(capsys, "convert", "--model", dirs["dense"], "--method", "prune", "--plan", dirs["plan"],
                           "--no-heal", "--out", a)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "heal", "--model", a, "--out", b, "--calib-tokens", 1024, "--steps", 5)
    assert code == 0, err
    [block] = read_record(b)["healing"]["blocks"]
    assert (block["host"], block["donors"], block["layer"]) == (1, [2, 3], 1)
    assert block["error"]["after"] <= block["error"]["closed_form"] <= block["error"]["before"]
    assert "mlp_scale" in block["closed_form"] or block["closed_form"]["kept"] == "conversion"
    model = AutoModelForCausalLM.from_pretrained(b)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 4
    moved = changed(safetensors_state(a), safetensors_state(b))
    assert moved and all(k.startswith("model.layers.1.mlp.") for k in moved), moved


def test_upcycle_heal_spreads_routers_and_keeps_the_output(capsys, dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = tmp_path / "upcycled", tmp_path / "healed"
    code, _, err = run_cli(capsys, "convert", "--model", dirs["dense"], "--method", "upcycle", "--no-heal", "--out", a)
    assert code == 0, err
    code, _, err = run_cli(capsys, "heal", "--model", a, "--out", b, "--calib-tokens", 1024, "--steps", 5)
    assert code == 0, err
    before = AutoModelForCausalLM.from_pretrained(a).eval()
    after = AutoModelForCausalLM.from_pretrained(b).eval()
    torch.testing.assert_close(logits(after), logits(before), rtol=0, atol=1e-5)
    blocks = read_record(b)["healing"]["blocks"]
    assert [x["layer"] for x in blocks] == list(range(6))
    for i, x in enumerate(blocks):
        assert sum(x["router_load"]) == pytest.approx(1.0, abs=1e-3)
        assert torch.count_nonzero(before.model.layers[i].mlp.gate.weight) == 0
        assert torch.count_nonzero(after.model.layers[i].mlp.gate.weight) > 0
    assert any(sum(load > 0 for load in x["router_load"]) > 1 for x in blocks)   # tokens are spread


def test_moe2dense_is_not_healed_and_says_why(capsys, dirs, tmp_path):
    """convert heals every method it can; moe2dense fuses no dense layers, so it is written unhealed, with
    the reason in its output and record, and asking for healing is refused."""
    from d2m_export.pipeline import MOE2DENSE_NOT_HEALED

    out = tmp_path / "back"
    code, stdout, err = run_cli(capsys, "convert", "--method", "moe2dense", "--model", dirs["a"], "--experts-kept", 1,
                                "--calib-tokens", 256, "--out", out)
    assert code == 0, err
    rec = read_record(out)
    assert rec["heal"] == {"healed": False, "reason": MOE2DENSE_NOT_HEALED} and "healing" not in rec
    assert f"  not healed: {MOE2DENSE_NOT_HEALED}" in stdout
    for flags in (["--heal"], ["--heal-steps", 2]):
        code, _, err = run_cli(capsys, "convert", "--method", "moe2dense", "--model", dirs["a"], "--experts-kept", 1,
                               *flags, "--out", tmp_path / "o")
        assert_user_error(code, err, flags[0], "nothing to heal")
        assert_nothing_written(tmp_path / "o")


# --- bad input: exit 2, one line, nothing written -------------------------------------------------

@pytest.fixture(scope="module")
def bad_dirs(dirs, tokenizer_dir):
    root = dirs["root"]
    no_record = root / "no-record"
    shutil.copytree(dirs["a"], no_record)
    (no_record / "d2m_plan.json").unlink()
    corrupt = root / "corrupt"
    shutil.copytree(dirs["a"], corrupt)
    (corrupt / "d2m_plan.json").write_text("{not json")
    other_method = root / "other-method"
    shutil.copytree(dirs["a"], other_method)
    rec = read_record(dirs["a"])
    (other_method / "d2m_plan.json").write_text(json.dumps({**rec, "method": "moe2dense"}))
    lost_dense = root / "lost-dense"
    shutil.copytree(dirs["a"], lost_dense)
    (lost_dense / "d2m_plan.json").write_text(json.dumps({**rec, "base_model": str(root / "gone")}))
    short = save_with_tokenizer(tiny_dense("llama", num_hidden_layers=4), root / "short", tokenizer_dir)
    return {**dirs, "no-record": no_record, "corrupt": corrupt, "other-method": other_method,
            "lost-dense": lost_dense, "short": short}


@pytest.mark.parametrize("model, extra, needle", [
    ("dense", [], "no d2m_plan.json"),
    ("no-record", [], "no d2m_plan.json"),
    ("corrupt", [], "corrupt"),
    ("other-method", [], "moe2dense"),
    ("a", ["--calib-tokens", 0], "--calib-tokens"),
    ("a", ["--calib-tokens", 300], "--calib-tokens"),
    ("a", ["--calib-corpus", "austen"], "austen"),
    ("a", ["--calib-corpus", "no-such-corpus.txt"], "no-such-corpus.txt"),
    ("lost-dense", [], "--dense"),
    ("a", ["--dense", "@short"], "layers"),
])
def test_heal_bad_input(capsys, bad_dirs, tmp_path, model, extra, needle):
    extra = [str(bad_dirs[x[1:]]) if str(x).startswith("@") else x for x in extra]
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "heal", "--model", bad_dirs[model], "--out", out, *extra)
    assert_user_error(code, err, needle)
    assert_nothing_written(out)


@pytest.mark.parametrize("extra, flag", [(["--steps", -1], "--steps"), (["--lr", 0], "--lr")])
def test_heal_errors_name_the_flag_given(capsys, dirs, tmp_path, extra, flag):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "heal", "--model", dirs["a"], "--out", out, *extra)
    assert_user_error(code, err)
    assert_nothing_written(out)
    message = err.strip().splitlines()[-1]
    assert f"{flag} " in message, message


def test_convert_heal_errors_name_the_flag_given(capsys, dirs, tmp_path):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "convert", "--model", dirs["dense"], "--plan", dirs["plan"], "--heal",
                           "--heal-tokens", 100, "--out", out)
    assert_user_error(code, err)
    assert_nothing_written(out)
    message = err.strip().splitlines()[-1]
    assert "--heal-tokens" in message, message      # --calib-tokens is another flag of convert


def test_heal_refuses_to_overwrite_its_input(capsys, dirs):
    a = dirs["a"]
    files = {p.name: p.read_bytes() for p in a.iterdir()}
    code, _, err = run_cli(capsys, "heal", "--model", a, "--out", a, "--calib-tokens", 512)
    assert_user_error(code, err, "new folder")
    assert {p.name: p.read_bytes() for p in a.iterdir()} == files
    assert not list(a.parent.glob(".a.*"))


@pytest.mark.parametrize("extra, needle", [
    (["--plan-search", "loss", "--method", "upcycle"], "upcycle"),
    (["--plan-search", "bogus"], "metric or loss"),
    (["--plan-search", "loss", "--plan", "@plan"], "--plan"),
    (["--plan-search", "loss", "--search-tokens", 100], "--search-tokens"),
    (["--plan-search", "loss", "--threshold", 0], "positive"),
    (["--plan-search", "loss", "--target-active-ratio", 0.5, "--search-tokens", 256], "cannot reach"),
    (["--target-active-ratio", 1.5], "--target-active-ratio"),
    (["--heal", "--heal-steps", -1], "-steps"),
    (["--heal", "--heal-tokens", 0], "tokens"),
    (["--no-heal", "--heal-steps", 10], "--no-heal"),
    (["--no-heal", "--heal-tokens", 1024], "--no-heal"),
])
def test_convert_bad_input(capsys, dirs, tmp_path, extra, needle):
    extra = [str(dirs[x[1:]]) if str(x).startswith("@") else x for x in extra]
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "convert", "--model", dirs["dense"], *extra, "--out", out)
    assert_user_error(code, err, needle)
    assert_nothing_written(out)


def test_add_donor_respects_a_max_block_of_one(capsys, dirs, tmp_path):
    """--max-block 1 allows no fusion (the metric planner then offers no candidates); a new block of
    two layers is too long too."""
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "convert", "--model", dirs["dense"], "--method", "prune", "--plan-search", "loss",
                           "--max-block", 1, "--target-active-ratio", 0.999, "--search-tokens", 256, "--no-heal",
                           "--out", out)
    if code == 0:
        blocks = read_record(out)["plan"]["blocks"]
        assert all(1 + len(b["donors"]) <= 1 for b in blocks), f"--max-block 1 gave blocks {blocks}"
    else:
        assert_user_error(code, err, "cannot reach")
    assert add_donor(Plan("prune", 6, []), 3, 1) is None
