"""The Pareto report: frontier logic, outputs, bad input, and the HTML page in headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import tiny_dense
from d2m_export.cli import main
from d2m_export.evaluation.report import pareto

# Synthetic measurements: this tests the report's arithmetic and rendering, not any runtime.
VARIANTS = [("dense", 1.0, 0.60, 20.0), ("lfuc-0.8", 0.8, 0.55, 16.0), ("prune-0.8", 0.8, 0.50, 17.0),
            ("lfuc-0.7", 0.7, 0.45, 14.0)]


def test_pareto_front():
    pts = [(20.0, 0.60, "a"), (16.0, 0.55, "b"), (17.0, 0.50, "c"), (14.0, 0.45, "d")]
    assert pareto(pts) == ["a", "b", "d"]


def make_runs(tmp_path, base="smollm2-135m", names=VARIANTS, positions=256, at_2048=None):
    """Run directories; `at_2048`: {name: ms} of a second bench, at context 2048 (the first one is from
    before bench results named their context: a 64-token prompt)."""
    runs = []
    cfg = tiny_dense("llama", max_position_embeddings=positions).config
    for name, ratio, acc, ms in names:
        run = tmp_path / name
        (run / "model").mkdir(parents=True)
        cfg.to_json_file(run / "model" / "config.json")
        (run / "variant.json").write_text(json.dumps({"name": name, "method": name.split("-")[0], "ratio": ratio,
                                                      "base_model": base}))
        (run / "eval.json").write_text(json.dumps({
            "perplexity": {"corpus": "austen", "tokens": 100, "value": 30 / acc},
            "tasks": {"arc_easy": {"acc": acc, "acc_norm": acc, "n": 10}}, "params": {"active": int(1e6 * ratio)}}))
        (run / "bench-onnx-fp32.json").write_text(json.dumps({"target": "onnx", "quant": "fp32",
                                                              "decode_tokens_per_s": 1000 / ms}))
        if at_2048 and name in at_2048:
            (run / "bench-onnx-fp32-2048.json").write_text(json.dumps({
                "target": "onnx", "quant": "fp32", "context": 2048, "prompt_tokens": 2048,
                "decode_tokens_per_s": 1000 / at_2048[name]}))
        runs.append(run)
    return runs


def test_report_outputs(tmp_path):
    runs = make_runs(tmp_path)
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contexts"] == [64]          # 2048, the other default, is beyond these models' 256 positions
    assert report["pareto"]["measured onnx fp32 @ 64"] == ["dense", "lfuc-0.8", "lfuc-0.7"]
    assert len(report["runs"]) == 4 and set(report["devices"]) >= {"raspberry-pi-5", "iphone-15-pro"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lfuc-0.8 |" in (out / "report.md").read_text()


def test_fronts_at_64_and_2048(tmp_path, capsys):
    # at 2048 the pruned model is measured faster than LF-UC at 0.8: it joins that front
    runs = make_runs(tmp_path, positions=4096, at_2048={"dense": 30.0, "lfuc-0.8": 26.0, "prune-0.8": 24.0})
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--devices", "raspberry-pi-5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contexts"] == [64, 2048] and report["projection"]["contexts"] == [64, 2048]
    assert report["runtimes"] == ["onnx fp32 @ 64", "onnx fp32 @ 2048"]
    assert report["pareto"]["measured onnx fp32 @ 64"] == ["dense", "lfuc-0.8", "lfuc-0.7"]
    assert report["pareto"]["measured onnx fp32 @ 2048"] == ["dense", "lfuc-0.8", "prune-0.8"]
    assert {"projected raspberry-pi-5 @ 64", "projected raspberry-pi-5 @ 2048"} <= report["pareto"].keys()
    for r in report["runs"]:      # the KV cache read at 2048 costs time in the projection
        assert r["projected_ms"]["raspberry-pi-5 @ 2048"] > r["projected_ms"]["raspberry-pi-5 @ 64"]
    assert {r["name"]: "onnx fp32 @ 2048" in r["measured"] for r in report["runs"]}["lfuc-0.7"] is False
    md = (out / "report.md").read_text()
    assert "context 64)" in md and "context 2048)" in md and "onnx fp32 @ 2048 ms/tok" in md
    assert 'id="projection-2048"' in (out / "report.html").read_text()
    # only the context asked for
    assert main(["report", *map(str, runs), "--devices", "raspberry-pi-5", "--context", "2048", "--out",
                 str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["runtimes"] == ["onnx fp32 @ 2048"]


@pytest.mark.parametrize("context, needle", [("4097", "beyond the 4096 positions"), ("0", "at least 1")])
def test_a_context_the_models_cannot_hold_is_refused(tmp_path, capsys, context, needle):
    runs = make_runs(tmp_path, positions=4096)
    code = main(["report", *map(str, runs), "--context", "64", context, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("d2m-export: error:") and needle in err
    assert not (tmp_path / "r").exists()


def test_a_sweep_directory_stands_for_its_runs(tmp_path, capsys):
    make_runs(tmp_path / "sweep")
    (tmp_path / "sweep" / "analysis").mkdir()                 # what sweep also leaves there
    assert main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]) == 0
    assert len(json.loads((tmp_path / "r" / "report.json").read_text())["runs"]) == 4
    code = main(["report", str(tmp_path / "sweep" / "analysis"), "--out", str(tmp_path / "r2")])
    assert code == 2 and "not a sweep run directory" in capsys.readouterr().err


def test_runs_of_different_base_models_are_refused(tmp_path, capsys):
    runs = make_runs(tmp_path / "a")[:2] + make_runs(tmp_path / "b", base="other-model")[:1]
    code = main(["report", *map(str, runs), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "different base models" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is installed by `make test`")
def test_html_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "report"
    assert main(["report", *map(str, make_runs(tmp_path)), "--out", str(out)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    page = (out / "report.html").as_uri()
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert 'id="pareto"' in dom.stdout and "data:image/png;base64," in dom.stdout
    assert dom.stdout.count("<tr>") >= 2 * (len(VARIANTS) + 1)
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,1600", page],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000          # a rendered page, not a blank one
    artifacts = tmp_path.parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "report_screenshot.png")
