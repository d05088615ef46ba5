"""Loss-aware planning (`convert --plan-search loss`) on tiny random Llama models under the SmolLM2
tokenizer: `add_donor`, the greedy search against an independent KL, the CLI record (`--max-block 1`
with the loss search: test_heal_cli.py, beside the other `convert` flags).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, save_with_tokenizer, tiny_dense
from d2m_export.plan.calibration import calibration_ids
from d2m_export.plan.loss_search import PlanLoss, add_donor, plan_by_loss
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan
from d2m_export.plan.planner import active_ratio
from heal_helpers import read_record, tokenizer  # noqa: F401 (tokenizer: a fixture)


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
