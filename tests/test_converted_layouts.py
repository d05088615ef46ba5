"""Every stage after `convert` on what `convert` writes with its defaults (the `converted` fixture, issue 36):
perplexity evaluation, every target's fp32 export with its parity check in the real runtime, and MoE → dense
of every MoE layout. Training (single process, DDP, FSDP, resume) on the same layouts is in test_train.py and
test_fsdp.py; healing runs inside every `convert` of the fixture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CONVERTED_LAYOUTS, run_cli
from d2m_export.errors import UserError
from runtimes.base import load_runner

# target -> its lossless precision (Core ML has none: fp16, whose lowered module is checked in fp32 on Linux)
TARGETS = {"onnx": "fp32", "gguf": "f32", "executorch": "fp32", "coreml": "fp16"}
MOE_LAYOUTS = [name for name in CONVERTED_LAYOUTS if name not in ("prune", "moe2dense")]


@pytest.mark.parametrize("layout", list(CONVERTED_LAYOUTS))
def test_evaluates(capsys, converted, tmp_path, layout):
    out = tmp_path / "eval.json"
    code, _, err = run_cli(capsys, "eval", "--model", converted(layout), "--tasks", "none", "--ppl-tokens", "512",
                           "--out", out)
    assert code == 0, err
    ppl = json.loads(out.read_text())["perplexity"]["value"]
    assert 1 < ppl < 1e6


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("layout", list(CONVERTED_LAYOUTS))
def test_exports_with_exact_parity(capsys, converted, tmp_path, layout, target):
    out = tmp_path / target
    code, _, err = run_cli(capsys, "--target", target, "--model", converted(layout), "--quant", TARGETS[target],
                           "--threads", 2, "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["greedy_match"] == parity["greedy_total"] >= 32, parity
    for other in parity.get("other_runtimes", {}).values():
        assert other["greedy_match"] == other["greedy_total"], other
    if layout == "lfuc" and target != "coreml":
        for runtime in [target, *parity.get("other_runtimes", {})]:
            check_rewind(out, runtime)


def check_rewind(export_dir, runtime):
    """Rewinding to the prompt (what the speed benchmarks do each round) decodes exactly as the first time."""
    runner = load_runner(export_dir, threads=1, runtime=runtime)
    try:
        prompt, steps = list(range(3, 15)), [5, 6, 7]
        runner.prefill(prompt)
        first = [runner.decode(t) for t in steps]
        runner.rewind(len(prompt))
        again = [runner.decode(t) for t in steps]
        np.testing.assert_array_equal(np.stack(first), np.stack(again), err_msg=runtime)
        with pytest.raises(UserError, match="cannot rewind"):
            runner.rewind(len(prompt) + len(steps) + 1)
    finally:
        runner.close()


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_moe_to_dense(capsys, converted, tmp_path, layout):
    out = tmp_path / "dense"
    code, _, err = run_cli(capsys, "convert", "--model", converted(layout), "--method", "moe2dense",
                           "--experts-kept", "1", "--out", out)
    assert code == 0, err
    plan = json.loads((out / "d2m_plan.json").read_text())
    assert plan["method"] == "moe2dense" and (out / "model.safetensors").is_file()
