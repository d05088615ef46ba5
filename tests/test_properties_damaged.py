"""Property-based tests (hypothesis) of the files we write and read back: damaged JSON (a checkpoint's
config.json and d2m_plan.json, an export's manifest.json) and damaged model files (safetensors, GGUF, each
export's artifact in its runtime), and the regressions hypothesis found. The property, as in
test_properties.py: exit 0 with a valid output, or exit 2 with one `d2m-export: error:` line and nothing
at --out (property_helpers.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from property_helpers import (JSON_VALUES, budget, check_outcome, error_lines, fresh, is_export,  # noqa: F401
                              is_results_json, loads_as_checkpoint, run, world)     # world: a fixture


# --- 4. the JSON files we write and read back ---------------------------------------------------

def mutations(text: str):
    """Ways to damage a JSON document: truncate it, flip a byte, drop a key, or replace a value."""
    doc = json.loads(text)
    paths = list(_paths(doc))

    def replace(path, value):
        new = json.loads(text)
        if not path:
            return json.dumps(value)
        parent = new
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        return json.dumps(new)

    def drop(path):
        new = json.loads(text)
        parent = new
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return json.dumps(new)

    return st.one_of(
        st.integers(0, len(text) - 1).map(lambda n: text[:n]),
        st.tuples(st.integers(0, len(text) - 1), st.integers(0, 7)).map(
            lambda p: _flip(text.encode(), *p)),
        st.sampled_from([p for p in paths if p]).map(drop),
        st.tuples(st.sampled_from(paths), JSON_VALUES).map(lambda pv: replace(*pv)))


def _paths(doc, prefix=()):
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


def _flip(data: bytes, at: int, bit: int) -> bytes:
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]


def damaged_copy(src: Path, work: Path, name: str, content) -> Path:
    d = fresh(work, src.name)
    shutil.copytree(src, d)
    (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


MODEL_COMMANDS = {
    "eval": lambda m, out: ["eval", "--model", m, "--tasks", "none", "--ppl-tokens", 1024, "--out", out],
    "heal": lambda m, out: ["heal", "--model", m, "--calib-tokens", 1024, "--steps", 1, "--out", out],
    "gguf": lambda m, out: ["--target", "gguf", "--model", m, "--threads", 1, "--out", out],
}
VALID = {"eval": is_results_json({"perplexity"}), "heal": loads_as_checkpoint, "gguf": is_export}


@pytest.mark.parametrize("name", ["config.json", "d2m_plan.json"])
def test_damaged_checkpoint_json(world, name):
    text = (world["lfuc"] / name).read_text()

    @budget(12)
    @given(mutations(text), st.sampled_from(sorted(MODEL_COMMANDS)))
    def prop(content, command):
        model = damaged_copy(world["lfuc"], world["work"], name, content)
        out = model.parent / "out"
        check_outcome(*run(MODEL_COMMANDS[command](model, out)), out, VALID[command])

    prop()


def test_damaged_manifest(world):
    text = (world["gguf"] / "manifest.json").read_text()

    @budget(12)
    @given(mutations(text), st.sampled_from(["bench", "generate"]))
    def prop(content, command):
        export = damaged_copy(world["gguf"], world["work"], "manifest.json", content)
        out = export.parent / "bench.json"
        argv = (["bench", export, "--prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1, "--out", out]
                if command == "bench" else ["generate", export, "--prompt", "Hi", "--max-new-tokens", 2])
        check_outcome(*run(argv), out if command == "bench" else None,
                      is_results_json({"decode_tokens_per_s"}) if command == "bench" else lambda _: None)

    prop()


# --- 5. truncated or bit-flipped model files -----------------------------------------------------

def damage(data: bytes):
    """Truncated anywhere, or one bit flipped in the first 64 KiB (headers and metadata live there)."""
    return st.one_of(st.integers(0, len(data) - 1).map(lambda n: data[:n]),
                     st.tuples(st.integers(0, min(len(data), 1 << 16) - 1), st.integers(0, 7)).map(
                         lambda p: _flip(data, *p)))


def test_damaged_safetensors(world):
    data = (world["lfuc"] / "model.safetensors").read_bytes()

    @budget(12)
    @given(damage(data))
    def prop(content):
        model = damaged_copy(world["lfuc"], world["work"], "model.safetensors", content)
        out = model.parent / "eval.json"
        check_outcome(*run(MODEL_COMMANDS["eval"](model, out)), out, VALID["eval"])

    prop()


def test_damaged_gguf_as_model(world):
    data = next(world["gguf"].glob("*.gguf")).read_bytes()
    dense_gguf = world["work"] / "dense-gguf"
    code, err = run(["--target", "gguf", "--model", world["dense"], "--threads", 1, "--out", dense_gguf])
    assert code == 0, err
    data = (dense_gguf / "model-f32.gguf").read_bytes()

    @budget(8)
    @given(damage(data))
    def prop(content):
        path = fresh(world["work"], "model.gguf")
        path.write_bytes(content)
        out = path.parent / "eval.json"
        check_outcome(*run(["eval", "--model", path, "--tasks", "none", "--ppl-tokens", 1024, "--out", out]), out,
                      VALID["eval"])

    prop()


@pytest.mark.parametrize("target", ["gguf", "onnx", "executorch"])
def test_damaged_artifacts_in_their_runtime(world, target):
    if target not in world:
        pytest.importorskip("executorch")
        code, err = run(["--target", target, "--model", world["lfuc"], "--threads", 1,
                         "--out", world["work"] / target])
        assert code == 0, err
        world[target] = world["work"] / target
    manifest = json.loads((world[target] / "manifest.json").read_text())
    artifact = manifest["files"][0]
    data = (world[target] / artifact).read_bytes()

    @budget(8)
    @given(damage(data))
    def prop(content):
        export = damaged_copy(world[target], world["work"], artifact, content)
        out = export.parent / "bench.json"
        check_outcome(*run(["bench", export, "--prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1, "--out", out]),
                      out, is_results_json({"decode_tokens_per_s"}))

    prop()


def test_exports_without_checksums_still_load(world):
    """Exports from before checksums were recorded: loaded as they are."""
    export = fresh(world["work"], "old")
    shutil.copytree(world["gguf"], export)
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["checksums"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    out = export.parent / "bench.json"
    code, err = run(["bench", export, "--prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1, "--out", out])
    assert code == 0, err


@pytest.mark.parametrize("damage_of", ["empty", "flip-212-2"])
def test_damaged_gguf_found_by_hypothesis(world, damage_of):
    """Regressions: an empty model file was a traceback from llama-cpp-python, and one bit flipped in
    the GGUF metadata aborted llama.cpp (exit -6, killing the caller). Both are refused first now."""
    data = next(world["gguf"].glob("*.gguf")).read_bytes()
    content = b"" if damage_of == "empty" else _flip(data, 212, 2)
    export = damaged_copy(world["gguf"], world["work"], next(world["gguf"].glob("*.gguf")).name, content)
    out = export.parent / "bench.json"
    code, err = run(["bench", export, "--prompt-tokens", 4, "--out", out])
    assert code == 2 and error_lines(err) == [l for l in err.splitlines() if l.strip()], err
    assert "is damaged" in err and "export again" in err and not out.exists()


def test_damaged_json_found_by_the_long_profile(world):
    """Regressions from `--hypothesis-profile long`: a d2m_plan.json holding `null` was an AttributeError in
    the exporter, and a manifest naming a file that is not there reached llama-cpp-python's ValueError."""
    model = damaged_copy(world["lfuc"], world["work"], "d2m_plan.json", "null")
    code, err = run(MODEL_COMMANDS["gguf"](model, model.parent / "out"))
    assert code == 2 and "d2m_plan.json is corrupt" in error_lines(err)[0], err
    manifest = json.loads((world["gguf"] / "manifest.json").read_text())
    manifest["files"] = ["lodel-f32.gguf"]
    export = damaged_copy(world["gguf"], world["work"], "manifest.json", json.dumps(manifest))
    code, err = run(["bench", export, "--out", export.parent / "bench.json"])
    assert code == 2 and "lists 'lodel-f32.gguf'" in error_lines(err)[0], err
