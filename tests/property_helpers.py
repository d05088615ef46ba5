"""What the property-based tests (test_properties.py, test_properties_flags.py) share: the property
itself, hypothesis budgets, and the tiny model and exports the commands run on, made once per test module."""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, note, settings

from conftest import save_with_tokenizer, tiny_dense, write_tiny_corpus
from d2m_export.cli import main

PLAN = "blocks:\n  - {host: 1, donors: [2, 3]}\n"


def budget(n: int):
    """`n` examples under the ci profile; the chosen profile's max_examples / 100 times that otherwise."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 100), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --- the property -------------------------------------------------------------------------------

def run(argv) -> tuple[int, str]:
    """`d2m-export argv...` in this process: (exit code, stderr). Any exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("d2m-export: error:")]


def check_outcome(code: int, err: str, out: Path | None, valid) -> None:
    """Exit 0 and `valid(out)` holds, or exit 2 with one error line and nothing at `out`."""
    note(f"exit {code}; stderr tail: {err[-600:]!r}")
    assert "Traceback" not in err
    assert code in (0, 2), f"exit {code}"
    if code == 2:
        assert len(error_lines(err)) == 1, err[-2000:]
        if out is not None:
            assert not out.exists(), f"{out} written by a refused command"
    else:
        valid(out)
    if out is not None:       # no temporary of ours left beside --out either way
        assert not list(out.parent.glob(f".{out.name}.tmp-*")), list(out.parent.iterdir())


def fresh(tmp: Path, name: str) -> Path:
    """A path that does not exist yet, under a per-example directory (examples share the fixture's tmp)."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    return d / name


# --- models, made once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("props")
    dense = save_with_tokenizer(tiny_dense("llama"), root / "dense", tokenizer_dir)
    (root / "plan.yaml").write_text(PLAN)
    lfuc = root / "lfuc"
    code, err = run(["convert", "--model", dense, "--plan", root / "plan.yaml", "--calib-tokens", 256, "--out", lfuc])
    assert code == 0, err
    exports = {}
    for target in ("gguf", "onnx"):
        code, err = run(["--target", target, "--model", lfuc, "--threads", 1, "--out", root / target])
        assert code == 0, err
        exports[target] = root / target
    write_tiny_corpus(root / "corpus.txt")
    work = root / "work"
    work.mkdir()
    return {"dense": dense, "lfuc": lfuc, "corpus": root / "corpus.txt", "work": work, **exports}


def loads_as_checkpoint(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    json.loads((out / "d2m_plan.json").read_text())
    AutoModelForCausalLM.from_pretrained(out)


def is_results_json(keys):
    def valid(out: Path) -> None:
        assert keys <= json.loads(out.read_text()).keys()
    return valid


def is_export(out: Path) -> None:
    from d2m_export.outputs import verify_checksums

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["greedy_total"] > 0 and manifest["files"]
    verify_checksums(out, manifest["checksums"])
