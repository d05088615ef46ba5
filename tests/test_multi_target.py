"""One model to several targets in one run (`--target onnx,gguf`, issue 37): one folder per target, each a
complete export with its own parity record, the parity reference computed once; `--no-parity`; per-phase
timings in every manifest."""
from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_cli, save_with_tokenizer, tiny_dense

PHASES = {"prepare", "export", "manifest", "checksums", "total"}
CHECK_PHASES = {"parity", "parity_reference", "runtime_check"}


@pytest.fixture
def tiny(tmp_path, tokenizer_dir):
    (tmp_path / "tiny").mkdir()
    return save_with_tokenizer(tiny_dense("llama"), tmp_path / "tiny", tokenizer_dir)


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def count_calls(monkeypatch, module, name: str, calls: dict) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_two_targets_in_one_run_share_one_reference(tmp_path, tiny, capsys, monkeypatch):
    import converters.parity as parity
    from d2m_export.sources import models

    calls: dict = {}
    count_calls(monkeypatch, models, "load_fp32_compute", calls)
    for name in ("reference_greedy", "reference_text"):
        count_calls(monkeypatch, parity, name, calls)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--target", "onnx,gguf", "--model", tiny, "--threads", 2, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["gguf", "onnx"]      # no temporaries left beside them
    assert f"to {out / 'onnx'}" in stdout and f"to {out / 'gguf'}" in stdout

    # the reference: the model loaded once, each prompt's greedy continuation and the fixed text computed once
    assert calls == {"load_fp32_compute": 1, "reference_greedy": 2, "reference_text": 1}
    manifests = {t: manifest(out / t) for t in ("onnx", "gguf")}
    assert manifests["onnx"]["parity"]["reference_shared"] is False
    assert manifests["gguf"]["parity"]["reference_shared"] is True
    assert manifests["gguf"]["timings_s"]["parity_reference"] < manifests["onnx"]["timings_s"]["parity_reference"]

    # each a complete export, with full fp32 parity in its own runtime(s)
    for target, quant in (("onnx", "fp32"), ("gguf", "f32")):
        m = manifests[target]
        assert (m["target"], m["quant"], m["parity_skipped"]) == (target, quant, False)
        assert all((out / target / f).is_file() for f in [*m["files"], *m["tokenizer"], ".d2m-export"])
        assert set(m["checksums"]) >= set(m["files"])
        p = m["parity"]
        assert p["greedy_match"] == p["greedy_total"] == 64 and p["max_abs_logit_err"] <= 1e-2
        assert p["text"]["top1_agreement"] == 1.0
        for other in p.get("other_runtimes", {}).values():
            assert other["greedy_match"] == other["greedy_total"]
        assert PHASES | CHECK_PHASES | {"load"} <= m["timings_s"].keys()
        assert all(v >= 0 for v in m["timings_s"].values())
        assert m["wall_s"].keys() == {"export", "parity"}
    # the same reference for both: the same greedy tokens recorded
    assert [q["reference_tokens"] for q in manifests["onnx"]["parity"]["prompts"]] == \
        [q["reference_tokens"] for q in manifests["gguf"]["parity"]["prompts"]]


@pytest.mark.parametrize("argv, needles", [
    (["--target", "onnx,nope"], ["nope"]),
    (["--target", "onnx,onnx"], ["twice"]),
    (["--target", "onnx,"], ["--target"]),
    (["--target", "onnx,gguf", "--quant", "int4"], ["int4", "gguf"]),            # one quant all must take
    (["--target", "onnx,gguf", "--quant", "int4,int4"], ["int4", "gguf"]),       # aligned with the targets
    (["--target", "onnx,gguf", "--quant", "int4,q4_0,f16"], ["--quant"]),        # one per target, not three
    (["--target", "gguf,executorch", "--head-bits", "8"], ["--head-bits"]),      # no target takes it
])
def test_bad_target_list_refused_before_any_work(tmp_path, tiny, capsys, monkeypatch, argv, needles):
    from d2m_export.sources import models

    def no_work(*args, **kwargs):
        raise AssertionError("a bad request must be refused before any work")

    monkeypatch.setattr(models, "load_model", no_work)
    code, _, err = run_cli(capsys, *argv, "--model", tiny, "--out", tmp_path / "out")
    assert_user_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]      # nothing written


def test_no_parity_recorded_and_warned(tmp_path, tiny, capsys, monkeypatch):
    import converters.parity as parity
    from d2m_export.api import Exports, export

    def no_check(*args, **kwargs):
        raise AssertionError("--no-parity must skip the parity check")

    monkeypatch.setattr(parity, "check_parity", no_check)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--target", "onnx,gguf", "--model", tiny, "--no-parity", "--out", out)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("d2m-export: warning: --no-parity")]
    assert len(warnings) == 2
    for target in ("onnx", "gguf"):
        m = manifest(out / target)
        assert m["parity"] is None and m["parity_skipped"] is True
        assert PHASES <= m["timings_s"].keys() and not CHECK_PHASES & m["timings_s"].keys()

    # one target: the folder is the export itself, as without --no-parity
    code, _, err = run_cli(capsys, "--target", "gguf", "--model", tiny, "--no-parity", "--out", tmp_path / "one")
    assert code == 0, err
    assert manifest(tmp_path / "one")["parity_skipped"] is True and "warning: --no-parity" in err

    # the API: a list of targets gives `Exports`
    several = export(tiny, tmp_path / "api", ["gguf", "onnx"], parity=False)
    assert isinstance(several, Exports) and several.exports.keys() == {"gguf", "onnx"}
    assert several["onnx"].manifest["parity_skipped"] is True and several["onnx"].dir == tmp_path / "api" / "onnx"


def test_failed_target_leaves_nothing_and_the_others_stay(tmp_path, tiny, capsys, monkeypatch):
    from converters.base import exact, get_target

    monkeypatch.setitem(get_target("gguf").tolerances, "f32", exact(-1.0))      # no export can pass it
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--target", "gguf,onnx", "--model", tiny, "--threads", 2, "--out", out)
    assert code == 1
    assert "parity check failed" in err and "--target gguf failed" in err and str(out / "onnx") in err
    assert sorted(p.name for p in out.iterdir()) == ["onnx"]          # no gguf folder, no temporary
    m = manifest(out / "onnx")         # written after the failed one, with its full check
    assert m["parity"]["greedy_match"] == m["parity"]["greedy_total"] == 64


def test_every_target_failing_leaves_not_even_the_folder(tmp_path, tiny, capsys, monkeypatch):
    import converters.parity as parity
    from d2m_export.errors import ParityError

    def fail(exporter, *args, **kwargs):
        raise ParityError(f"{exporter.name}: forced")

    monkeypatch.setattr(parity, "check_parity", fail)
    code, _, err = run_cli(capsys, "--target", "onnx,gguf", "--model", tiny, "--out", tmp_path / "out")
    assert code == 1 and "--target onnx failed" in err and "--target gguf failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
