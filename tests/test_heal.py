"""Local healing, below the command line: what is fitted, and the fit (the command line, `heal` and
`convert`, which heals by default: test_heal_cli.py; loss-aware planning: test_plan_search.py).

Tiny random models under the SmolLM2 tokenizer, calibration text from the training corpus:
- the fit itself: the dense block targets are what the dense layers produce; the closed form
  lowers the block reconstruction error on held-out windows (checked again through the converted
  model as transformers runs it); distillation never ends above where it started;
- an empty plan heals to exactly the same model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, save_with_tokenizer, tiny_dense
from d2m_export.plan.calibration import collect
from d2m_export.heal import WINDOW, HealConfig, calibration_windows, heal_model
from d2m_export.heal.blocks import collect_blocks, converted_index
from d2m_export.heal.fit import distill, fit_closed_form, relative_error
from d2m_export.heal.layer import LayerRunner
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan
from heal_helpers import changed, logits, read_record, tokenizer  # noqa: F401 (tokenizer: a fixture)

BLOCK = [Block(1, [2, 3])]                      # 6 layers -> 4


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
