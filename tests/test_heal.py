"""Local healing (`heal`, and `convert`, which heals by default) and loss-aware planning
(`convert --plan-search loss`).

Tiny random models under the SmolLM2 tokenizer, calibration text from the training corpus:
- the fit itself: the dense block targets are what the dense layers produce; the closed form
  lowers the block reconstruction error on held-out windows (checked again through the converted
  model as transformers runs it); distillation never ends above where it started;
- an empty plan heals to exactly the same model;
- the command line: a healed model loads with plain transformers, records what healing did (the
  held-out errors are recomputed independently), and exports with parity; prune and upcycle heal
  (upcycle: output unchanged, routers spread); bad input exits 2 and writes nothing;
- loss-aware planning: `add_donor`, the greedy search against an independent KL, the CLI record.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_user_error, export_with_cli, run_cli, save_with_tokenizer, tiny_dense
from d2m_export.plan.calibration import calibration_ids, collect
from d2m_export.cli import main
from d2m_export.heal import WINDOW, HealConfig, calibration_windows, heal_model
from d2m_export.heal.blocks import collect_blocks, converted_index
from d2m_export.heal.fit import distill, fit_closed_form, relative_error
from d2m_export.heal.layer import LayerRunner
from d2m_export.plan.loss_search import PlanLoss, add_donor, plan_by_loss
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan
from d2m_export.plan.planner import active_ratio

BLOCK = [Block(1, [2, 3])]                      # 6 layers -> 4
PLAN_YAML = "blocks:\n  - {host: 1, donors: [2, 3]}\n"
IDS = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def read_record(path) -> dict:
    return json.loads((path / "d2m_plan.json").read_text())


def safetensors_state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def windows(tokenizer):
    ids = calibration_windows(tokenizer, HealConfig(calib_tokens=2048))
    assert ids.shape == (2048 // WINDOW, WINDOW)
    return ids


# --- what is fitted, and the fit ------------------------------------------------------------------

CASES = {
    "lfuc-shared": ("lfuc", dict(host_mode="shared", router_init="zero")),
    "lfuc-routed": ("lfuc", dict(host_mode="routed", router_init="calibrated")),
    "prune": ("prune", {}),
}


def converted(arch: str, case: str, windows, blocks=BLOCK):
    dense = tiny_dense(arch, intermediate_size=64)
    method, options = CASES[case]
    plan = Plan(method, 6, blocks, Options(**options))
    acts = collect(dense, windows[:2], progress=False) if options.get("router_init") == "calibrated" else None
    return dense, plan, get_method(method).build(dense, plan, acts)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_targets_are_what_the_dense_layers_produce(arch, windows):
    dense = tiny_dense(arch)
    plan = Plan("lfuc", 6, [Block(1, [2]), Block(3, [4, 5])])     # the last block ends at the model's end
    before = state(dense)
    data = collect_blocks(dense, plan, windows[:2], progress=False)
    assert [d.layer for d in data] == [1, 2] == [converted_index(plan, 1), converted_index(plan, 3)]
    with torch.no_grad():
        hidden = dense(input_ids=windows[:2], output_hidden_states=True, use_cache=False).hidden_states
        for d in data:
            torch.testing.assert_close(d.x, hidden[d.block.host], rtol=0, atol=1e-6)
            h = d.x
            for i in [d.block.host, *d.block.donors]:       # the dense layers, one after another
                h = LayerRunner(dense, i)(h)
            torch.testing.assert_close(d.y, h, rtol=1e-5, atol=1e-5)
            assert (d.y - d.x).abs().max() > 1e-2
            # the dense block reproduces itself exactly: relative error 0
            assert relative_error(_Chain(dense, [d.block.host, *d.block.donors]), d) < 1e-8
    assert changed(before, state(dense)) == []
    fit, held = data[0].split(1)
    assert torch.equal(fit.x, data[0].x[:1]) and torch.equal(held.y, data[0].y[1:])


class _Chain:
    def __init__(self, model, layers):
        self.runners = [LayerRunner(model, i) for i in layers]

    def __call__(self, x):
        for r in self.runners:
            x = r(x)
        return x


def _through_transformers(model, layer: int, ids):
    """The fused layer's input and output as the whole converted model runs it in transformers."""
    seen = {}
    target = model.model.layers[layer]
    pre = target.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__("x", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    post = target.register_forward_hook(
        lambda mod, args, out: seen.__setitem__("y", (out[0] if isinstance(out, tuple) else out).clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        pre.remove()
        post.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("arch, case", [("llama", "lfuc-shared"), ("qwen2", "lfuc-shared"),
                                        ("llama", "lfuc-routed"), ("qwen2", "prune")])
def test_closed_form_lowers_held_out_block_error(arch, case, windows):
    dense, plan, model = converted(arch, case, windows)
    [data] = collect_blocks(dense, plan, windows, progress=False)
    fit, held = data.split(2)
    assert len(fit.x) == len(windows) - 2 and torch.equal(held.x, data.x[-2:])
    runner = LayerRunner(model, data.layer)
    start = state(model)
    before, before_fit = relative_error(runner, held), relative_error(runner, fit)
    assert 0.05 < before < 1.5

    info = fit_closed_form(runner, fit)
    after, after_fit = relative_error(runner, held), relative_error(runner, fit)
    assert after < before, (before, after, info)
    assert after_fit < before_fit, (before_fit, after_fit, info)
    # only the fused layer's FFN changed
    assert all(k.startswith(f"model.layers.{data.layer}.mlp.") for k in changed(start, state(model)))
    assert changed(start, state(model))
    if case == "prune":
        assert set(info) == {"mlp_scale"} and info["mlp_scale"] != 1.0
    else:
        n = model.model.layers[data.layer].mlp.experts.down_proj.shape[0]
        assert len(info["expert_scales"]) == len(info["router_load"]) == n
        assert sum(info["router_load"]) == pytest.approx(1.0, abs=1e-3)
        assert (info["shared_scale"] is None) == (case == "lfuc-routed")

    # the same held-out error, measured on the converted model as transformers runs it
    x, y = _through_transformers(model, data.layer, windows[-2:])
    torch.testing.assert_close(x, held.x, rtol=1e-5, atol=1e-5)   # the layers before the block are the dense ones
    measured = (y - held.y).pow(2).sum().item() / (held.y - held.x).pow(2).sum().item()
    assert measured == pytest.approx(after, rel=1e-4)
    # ... and the converted model's output moved towards the dense one's
    with torch.no_grad():
        teacher = dense(input_ids=windows[-2:], use_cache=False).logits.log_softmax(-1)
        healed = model(input_ids=windows[-2:], use_cache=False).logits.log_softmax(-1)
        model.load_state_dict(start)
        unhealed = model(input_ids=windows[-2:], use_cache=False).logits.log_softmax(-1)
    kl = lambda s: F.kl_div(s, teacher, log_target=True, reduction="sum").item()  # noqa: E731
    assert kl(healed) < kl(unhealed)


@pytest.mark.parametrize("case", ["lfuc-shared", "prune"])
def test_distill_never_ends_above_where_it_started(case, windows):
    dense, plan, model = converted("llama", case, windows)
    [data] = collect_blocks(dense, plan, windows, progress=False)
    fit, held = data.split(2)
    runner = LayerRunner(model, data.layer)
    fit_closed_form(runner, fit)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    outside = {k: v for k, v in state(model).items() if not k.startswith(f"model.layers.{data.layer}.")}

    start = relative_error(runner, held)
    rec = distill(runner, fit, held, steps=30, lr=1e-3, eval_every=10)
    end = relative_error(runner, held)
    history = [e for _, e in rec["held_out_error"]]
    assert history[0] == pytest.approx(start, abs=1e-5)
    assert end <= start + 1e-9 and end == pytest.approx(min(history), abs=1e-5)
    assert 1 <= rec["steps"] <= 30
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not model.model.layers[data.layer].training
    assert changed(outside, {k: v for k, v in state(model).items() if k in outside}) == []

    # a destructive learning rate: the best (starting) state is what remains
    kept = state(model)
    rec = distill(runner, fit, held, steps=20, lr=1.0, eval_every=5, patience=2)
    history = [e for _, e in rec["held_out_error"]]
    assert relative_error(runner, held) <= end + 1e-9
    if min(history[1:]) >= history[0]:
        assert changed(kept, state(model)) == []


def test_distill_with_attention_trains_the_host_attention_too(windows):
    dense, plan, model = converted("llama", "lfuc-shared", windows)
    [data] = collect_blocks(dense, plan, windows, progress=False)
    fit, held = data.split(2)
    runner = LayerRunner(model, data.layer)
    before, start = state(model), relative_error(runner, held)
    rec = distill(runner, fit, held, steps=20, lr=1e-3, attention=True, eval_every=10)
    assert rec["attention"] is True
    moved = changed(before, state(model))
    assert all(k.startswith(f"model.layers.{data.layer}.") for k in moved), moved
    assert any(".self_attn." in k for k in moved) and any(".mlp." in k for k in moved)
    assert relative_error(runner, held) < start


def test_heal_model_fits_every_block_and_leaves_the_rest(tokenizer, windows):
    dense, plan, model = converted("qwen2", "lfuc-shared", windows, blocks=[Block(1, [2]), Block(3, [4, 5])])
    dense_before, before = state(dense), state(model)
    record = heal_model(model, dense, tokenizer, plan, "lfuc", HealConfig(calib_tokens=1024, steps=10),
                        progress=False)
    assert record["calibration_tokens"] == 1024 and record["held_out_tokens"] == WINDOW
    assert [(b["host"], b["donors"], b["layer"]) for b in record["blocks"]] == [(1, [2], 1), (3, [4, 5], 2)]
    for b in record["blocks"]:
        e = b["error"]
        assert e["after"] <= e["closed_form"] <= e["before"], b
        assert e["after"] < e["before"], b
        assert b["distill"]["steps"] <= 10
    assert changed(dense_before, state(dense)) == []          # the teacher is left alone
    moved = changed(before, state(model))
    assert moved and all(k.startswith(("model.layers.1.mlp.", "model.layers.2.mlp.")) for k in moved)


# --- an empty plan heals to the same model --------------------------------------------------------

@pytest.mark.parametrize("method", ["lfuc", "prune"])
def test_heal_model_with_an_empty_plan_is_the_identity(method, tokenizer):
    dense = tiny_dense("qwen2")
    plan = Plan(method, 6, [])
    model = get_method(method).build(dense, plan)
    before, out = state(model), logits(model)
    record = heal_model(model, dense, tokenizer, plan, method, HealConfig(calib_tokens=512, steps=5), progress=False)
    assert record["blocks"] == []
    assert changed(before, state(model)) == []
    assert torch.equal(logits(model), out)


def test_heal_cli_with_an_empty_plan_is_the_identity(capsys, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    dense = save_with_tokenizer(tiny_dense("llama"), tmp_path / "dense", tokenizer_dir)
    plan = tmp_path / "empty.yaml"
    plan.write_text("blocks: []\n")
    code, _, err = run_cli(capsys, "convert", "--model", dense, "--plan", plan, "--no-heal", "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = run_cli(capsys, "heal", "--model", tmp_path / "a", "--out", tmp_path / "b",
                           "--calib-tokens", 512, "--steps", 5)
    assert code == 0, err
    assert read_record(tmp_path / "b")["healing"]["blocks"] == []
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert changed(state(a), state(b)) == []
    assert torch.equal(logits(a), logits(b))


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


# --- loss-aware planning --------------------------------------------------------------------------

def test_add_donor():
    empty = Plan("lfuc", 6, [])
    assert add_donor(empty, 0, 4) is None                                   # layer 0 cannot be a donor
    assert add_donor(empty, 3, 4).blocks == [Block(2, [3])]                 # a new block hosted by the layer before
    plan = Plan("lfuc", 6, [Block(1, [2])], Options(host_mode="shared", alpha=0.5))
    grown = add_donor(plan, 3, 4)
    assert grown.blocks == [Block(1, [2, 3])] and grown.options == plan.options and grown.num_layers == 6
    assert plan.blocks == [Block(1, [2])]                                   # the input plan is left alone
    assert add_donor(plan, 2, 4) is None                                    # a donor already
    assert add_donor(Plan("lfuc", 6, [Block(1, [2, 3])]), 4, 3) is None     # would make a 4-layer block
    assert add_donor(Plan("lfuc", 6, [Block(1, [2, 3])]), 4, 4).blocks == [Block(1, [2, 3, 4])]
    two = add_donor(add_donor(empty, 5, 4), 2, 4)                           # blocks stay ordered by host
    assert two.blocks == [Block(1, [2]), Block(4, [5])]
    two.validate()
    assert add_donor(two, 3, 4).blocks == [Block(1, [2, 3]), Block(4, [5])]
    # a host becoming a donor brings its donors along: under a new host, or merged into the block before
    assert add_donor(two, 4, 4).blocks == [Block(1, [2]), Block(3, [4, 5])]
    adjacent = Plan("lfuc", 6, [Block(0, [1]), Block(2, [3])])
    assert add_donor(adjacent, 2, 4).blocks == [Block(0, [1, 2, 3])]
    assert add_donor(adjacent, 2, 3) is None                                # would make a 4-layer block


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


def _kl(dense, pruned, ids) -> float:
    with torch.no_grad():
        teacher = dense(input_ids=ids, use_cache=False).logits.log_softmax(-1)
        student = pruned(input_ids=ids, use_cache=False).logits.log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum").item() / ids.numel()


def _skipped(dense, blocks):
    return get_method("prune").build(dense, Plan("prune", 6, blocks))


@pytest.mark.parametrize("method_name, host_mode", [("prune", "routed"), ("lfuc", "routed"), ("lfuc", "shared")])
def test_plan_by_loss_meets_the_ratio_with_the_kl_it_reports(tokenizer, method_name, host_mode):
    dense = tiny_dense("llama", initializer_range=0.1)     # layers that matter, so KLs are well apart
    ids = calibration_ids(tokenizer, 512)
    method, options = get_method(method_name), Options(host_mode=host_mode)
    measure = lambda p: active_ratio(method, dense.config, p)  # noqa: E731
    assert measure(Plan(method_name, 6, [Block(2, [3, 4, 5])], options)) <= 0.99      # reachable with max_block 4
    plan, rec = plan_by_loss(method_name, 6, PlanLoss(dense, ids), options, measure=measure, target=0.99,
                             progress=False)
    assert plan.options == options
    plan.validate()
    assert rec["plan_search"] == "loss" and rec["tokens"] == 512 and rec["wall_s"] >= 0
    assert sorted(s["donor"] for s in rec["steps"]) == plan.donors
    assert rec["kl"] == rec["steps"][-1]["kl"]
    # the reported KL is that of the dense model with the donors skipped, measured through transformers
    assert rec["kl"] == pytest.approx(_kl(dense, _skipped(dense, plan.blocks), ids), rel=1e-3, abs=1e-5)
    # the first step: the single layer whose removal costs least
    singles = {layer: _kl(dense, _skipped(dense, [Block(layer - 1, [layer])]), ids) for layer in range(1, 6)}
    assert rec["steps"][0]["donor"] == min(singles, key=singles.get)
    assert rec["steps"][0]["kl"] == pytest.approx(min(singles.values()), rel=1e-3, abs=1e-5)
    # the target is met, and the search stopped as soon as it was
    assert measure(plan) <= 0.99, f"plan {plan.blocks} stops at active ratio {measure(plan):.4f}"
    shorter = Plan(method_name, 6, [], options)
    for s in rec["steps"][:-1]:
        shorter = add_donor(shorter, s["donor"], 4)
    assert measure(shorter) > 0.99


def test_plan_by_loss_with_a_kl_budget_stops_before_it(tokenizer):
    dense = tiny_dense("llama", initializer_range=0.1)
    ids = calibration_ids(tokenizer, 256)
    budget = 0.1
    plan, rec = plan_by_loss("prune", 6, PlanLoss(dense, ids), Options(), max_kl=budget, max_block=3,
                             progress=False)
    plan.validate()
    assert plan.blocks and rec["kl"] <= budget
    assert all(len(b.donors) + 1 <= 3 for b in plan.blocks)
    assert _kl(dense, _skipped(dense, plan.blocks), ids) == pytest.approx(rec["kl"], rel=1e-3, abs=1e-5)
    for layer in range(1, 6):        # one more donor, any of them, goes past the budget
        more = add_donor(plan, layer, 3)
        if more is not None:
            assert _kl(dense, _skipped(dense, more.blocks), ids) > budget


@pytest.mark.parametrize("method, extra", [("lfuc", []), ("lfuc", ["--host-mode", "shared"]), ("prune", [])])
def test_convert_with_plan_search_loss(capsys, tmp_path, tokenizer_dir, method, extra):
    from transformers import AutoModelForCausalLM

    dense = save_with_tokenizer(tiny_dense("llama", initializer_range=0.1), tmp_path / "dense", tokenizer_dir)
    out = tmp_path / method
    code, stdout, err = run_cli(capsys, "convert", "--model", dense, "--method", method, "--plan-search", "loss",
                                "--target-active-ratio", 0.99, "--search-tokens", 256, "--no-heal", *extra,
                                "--out", out)
    assert code == 0, err
    assert "plan search by loss" in stdout
    rec = read_record(out)
    assert rec["params"]["active_ratio"] <= 0.99
    ps = rec["plan_search"]
    assert {"wall_s", "kl", "steps"} <= ps.keys() and ps["tokens"] == 256 and ps["kl"] > 0
    donors = sorted(d for b in rec["plan"]["blocks"] for d in b["donors"])
    assert donors and sorted(s["donor"] for s in ps["steps"]) == donors
    assert ps["kl"] == ps["steps"][-1]["kl"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 - len(donors)
