"""End to end on the embedded SmolLM2-135M: analyze → convert → load → evaluate (a few minutes)."""
from __future__ import annotations

import json

import pytest

from d2m_export.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "analysis"
    assert main(["analyze", "--calib-tokens", "1024", "--out", str(out)]) == 0
    return out / "similarity.json"


def test_analysis_of_smollm2(analysis):
    data = json.loads(analysis.read_text())
    assert data["model"] == "smollm2-135m" and data["num_layers"] == 30
    singles = {b["start"]: b["angular_distance"] for b in data["blocks"] if b["length"] == 1}
    # The first layer rewrites the embedding the most; middle layers are the redundant ones.
    assert singles[0] > max(singles[i] for i in range(10, 20))


def test_lfuc_at_0_8_converts_loads_and_evaluates(analysis, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lfuc"
    assert main(["convert", "--target-active-ratio", "0.8", "--analysis", str(analysis), "--no-heal",
                 "--out", str(out)]) == 0
    record = json.loads((out / "d2m_plan.json").read_text())
    assert 0.75 <= record["params"]["active_ratio"] <= 0.8
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.num_hidden_layers == 30 - sum(len(b["donors"]) for b in record["plan"]["blocks"])

    dense_json, fused_json = tmp_path / "dense.json", tmp_path / "fused.json"
    for model_spec, dest in (("smollm2-135m", dense_json), (str(out), fused_json)):
        assert main(["eval", "--model", model_spec, "--tasks", "arc_easy", "--limit", "40",
                     "--ppl-tokens", "2048", "--out", str(dest)]) == 0
    dense, fused = json.loads(dense_json.read_text()), json.loads(fused_json.read_text())
    # the first token of each 512-token window has no context and is not scored
    assert dense["perplexity"]["corpus"] == "austen" and dense["perplexity"]["tokens"] == 2048 - 4
    assert 15 < dense["perplexity"]["value"] < 60            # ~33 on 10k tokens of Austen
    # Fusion without healing costs perplexity, but the model still works.
    assert dense["perplexity"]["value"] < fused["perplexity"]["value"] < 20 * dense["perplexity"]["value"]
    assert dense["tasks"]["arc_easy"]["n"] == 40 and 0 <= fused["tasks"]["arc_easy"]["acc"] <= 1
