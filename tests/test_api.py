"""The Python API (`d2m_export.api`): its documented example runs, and writes what the command line writes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from conftest import run_cli


def example_code() -> str:
    """The example in d2m_export.api's docstring: the indented block after its `::`."""
    from d2m_export import api

    block = api.__doc__.split("::\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_import_is_cheap_and_names_resolve():
    code = textwrap.dedent("""
        import sys
        import d2m_export
        from d2m_export import analyze, bench, convert, evaluate, export, Checkpoint
        from d2m_export.api import heal, train
        heavy = sorted(m for m in ("torch", "transformers", "numpy", "onnx", "converters", "runtimes",
                                   "d2m_export.pipeline") if m in sys.modules)
        assert not heavy, heavy
        assert all(callable(f) and f.__doc__ for f in (analyze, bench, convert, evaluate, export, heal, train))
        import d2m_export.heal, d2m_export.train     # the subpackages keep their names
        assert type(d2m_export.heal).__name__ == "module" and hasattr(d2m_export.heal, "HealConfig")
        assert d2m_export.api.heal is heal
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def read_json(path):
    return json.loads(path.read_text())


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def same_weights(a, b) -> None:
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_example_writes_what_the_cli_writes(capsys, converted, tmp_path):
    """analyze -> convert (unhealed) -> export onnx fp32 -> bench, once through the API (the docstring's
    example, on a tiny model) and once through the command line: the same files, JSON and weights."""
    dense = converted("llama")       # wide tiny MLPs: the default ratio 0.8 is reachable
    code = example_code()
    inputs = 'model, runs, calib_tokens, ratio = "smollm2-135m", Path("runs/api"), 2048, 0.8'
    assert inputs in code
    api_runs, cli_runs = tmp_path / "api", tmp_path / "cli"
    code = code.replace(inputs, f"model, runs, calib_tokens, ratio = {str(dense)!r}, Path({str(api_runs)!r}), 256, 0.8")
    scope: dict = {}
    exec(compile(code, "d2m_export.api example", "exec"), scope)
    capsys.readouterr()

    for argv in (["analyze", "--model", dense, "--calib-tokens", 256, "--out", cli_runs / "analysis"],
                 ["convert", "--model", dense, "--out", cli_runs / "lfuc", "--analysis",
                  cli_runs / "analysis" / "similarity.json", "--calib-tokens", 256, "--target-active-ratio", 0.8,
                  "--no-heal"],
                 ["--target", "onnx", "--model", cli_runs / "lfuc", "--quant", "fp32", "--out", cli_runs / "lfuc-onnx"],
                 ["bench", cli_runs / "lfuc-onnx", "--out", cli_runs / "lfuc-onnx.bench.json"]):
        status, _, err = run_cli(capsys, *argv)
        assert status == 0, err

    # the hand-offs: what each stage wrote, serialisable
    analysis, moe, onnx, speed = (scope[k] for k in ("analysis", "moe", "onnx", "speed"))
    for handoff in (analysis, moe, onnx, speed):
        json.dumps(handoff.to_dict())
    assert analysis.similarity == read_json(api_runs / "analysis" / "similarity.json")
    assert moe.plan == read_json(api_runs / "lfuc" / "d2m_plan.json") and moe.plan["heal"]["healed"] is False
    assert onnx.manifest == read_json(api_runs / "lfuc-onnx" / "manifest.json")
    assert {"generator": "d2m-export", **speed.result} == read_json(api_runs / "lfuc-onnx.bench.json")

    # analyze: the same scores (same model label, calibration text and arithmetic)
    assert files(api_runs / "analysis") == files(cli_runs / "analysis")
    assert analysis.similarity == read_json(cli_runs / "analysis" / "similarity.json")

    # convert: the same plan record (but its wall time) and the same weights
    assert files(api_runs / "lfuc") == files(cli_runs / "lfuc")
    cli_plan = read_json(cli_runs / "lfuc" / "d2m_plan.json")
    assert moe.plan.keys() == cli_plan.keys()
    assert {**moe.plan, "wall_s": None} == {**cli_plan, "wall_s": None}
    assert moe.plan["plan"]["blocks"]
    for name in ("config.json", "generation_config.json"):
        assert read_json(api_runs / "lfuc" / name) == read_json(cli_runs / "lfuc" / name)
    same_weights(api_runs / "lfuc", cli_runs / "lfuc")

    # export: the same files, byte for byte (checksums), and manifest; `model` is the folder exported
    assert files(api_runs / "lfuc-onnx") == files(cli_runs / "lfuc-onnx")
    cli_manifest = read_json(cli_runs / "lfuc-onnx" / "manifest.json")
    assert onnx.manifest.keys() == cli_manifest.keys()
    assert onnx.manifest["model"] == str(api_runs / "lfuc") and cli_manifest["model"] == str(cli_runs / "lfuc")
    timed = {"model": None, "wall_s": None, "timings_s": None}
    assert {**onnx.manifest, **timed} == {**cli_manifest, **timed}

    # bench: the same record; the timings are the machine's
    cli_bench = read_json(cli_runs / "lfuc-onnx.bench.json")
    assert {"generator", *speed.result} == cli_bench.keys()
    timed = {"prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token_p50", "peak_rss_mb", "model"}
    assert {k: v for k, v in speed.result.items() if k not in timed} == \
        {k: v for k, v in cli_bench.items() if k not in timed | {"generator"}}
