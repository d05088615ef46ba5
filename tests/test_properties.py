"""Property-based tests (hypothesis) of every surface that takes input: numeric flags, plan files,
the JSON files we write and read back, and model files.

The property, everywhere: the command exits 0 with a valid output, or exits 2 with one
`d2m-export: error:` line and nothing at --out. Never a traceback, never a half-written output.

Budgets scale with the hypothesis profile (`--hypothesis-profile long` for a longer local run; the
default `ci` profile keeps the whole file to a few minutes). Each test's budget is in units of
the profile's `max_examples` / 100.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import save_with_tokenizer, tiny_dense, write_tiny_corpus
from d2m_export.cli import main
from d2m_export.cli.parser import build_parser

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


# --- 1. every numeric flag, at parse time --------------------------------------------------------

def numeric_flags():
    """(command or None for the export group, flag, its validator) for every typed flag of every command."""
    parser = build_parser()
    found = [(None, a.option_strings[-1], a.dest, a.type) for a in parser._actions if hasattr(a.type, "bounds")]
    for action in parser._actions:
        for name, sub in (getattr(action, "choices", None) or {}).items():
            if isinstance(sub, type(parser)):
                found += [(name, a.option_strings[-1], a.dest, a.type) for a in sub._actions
                          if hasattr(a.type, "bounds")]
    return found


NUMERIC_FLAGS = numeric_flags()
NUMBER_TEXT = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-2, 2).map(str),
    st.sampled_from(["", " ", "-0", "0", "1", "1e309", "-1e-320", "0x10", "1_000", " 3", "nan", "-inf", "½", "٣",
                     "1.5", "2**8", "None", "--", "-1"]),
    st.text(max_size=6))
REQUIRED = {"analyze": ["--out", "o"], "convert": ["--out", "o"], "heal": ["--model", "m", "--out", "o"],
            "train": ["--model", "m", "--out", "o"], "report": ["r", "--out", "o"], "sweep": ["--out", "o"],
            "bench": ["d", "--out", "o"], "generate": ["d", "--prompt", "p"], "tokenize": ["c", "--out", "o"],
            "serve": ["d"]}


def test_the_flag_table_is_complete():
    commands = {c for c, *_ in NUMERIC_FLAGS}
    assert {None, "analyze", "convert", "heal", "eval", "train", "bench", "generate", "sweep", "demo"} <= commands
    assert len(NUMERIC_FLAGS) >= 50


@budget(1500)
@given(st.sampled_from(NUMERIC_FLAGS), NUMBER_TEXT)
def test_every_numeric_flag_is_in_range_or_refused_in_one_line(flag, text):
    command, option, dest, kind = flag
    argv = ([command] if command else []) + REQUIRED.get(command, []) + [f"{option}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) if _refused(kind, text) else contextlib.nullcontext():
        args = build_parser().parse_args(argv)
    if err.getvalue():                    # refused: one line, and it names the flag
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("d2m-export: error: ") and option in lines[0], lines
        return
    value = getattr(args, dest)
    low, high, integer = kind.bounds
    assert math.isfinite(value) and (not integer or isinstance(value, int))
    assert (low is None or value >= low) and (high is None or value <= high)


def _refused(kind, text: str) -> bool:
    """What the validator must refuse, decided independently of it."""
    low, high, integer = kind.bounds
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        return True
    if not math.isfinite(value):
        return True
    return bool((low is not None and value < low) or (high is not None and value > high)
                or (value == low and kind.open_low) or (value == high and kind.open_high))


# --- 2. whole commands on tiny models, with numeric flags in and around their ranges ------------

def ints(lo, hi):
    return st.integers(lo, hi).map(str)


def floats(lo, hi):
    return st.one_of(st.floats(lo, hi).map(repr), st.sampled_from(["nan", "inf", "-inf", "x"]))


def some_flags(table: dict):
    """A few of `table`'s flags, each with a value from its strategy, as argv."""
    return st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*[table[n].map(lambda v, n=n: [n, v]) for n in names])).map(
        lambda pairs: [x for pair in pairs for x in pair])


CONVERT_FLAGS = {"--target-active-ratio": floats(-0.2, 1.2), "--threshold": floats(-0.1, 1.0),
                 "--calib-tokens": ints(-10, 700), "--max-block": ints(-1, 7), "--top-k": ints(-1, 4),
                 "--num-experts": ints(-1, 5), "--alpha": floats(-2, 2), "--beta": floats(-2, 2),
                 "--min-mlp-cos": floats(-1.5, 1.5)}


@budget(12)
@given(st.sampled_from(["lfuc", "prune", "upcycle"]), some_flags(CONVERT_FLAGS))
def test_convert(world, method, flags):
    if "--calib-tokens" not in flags:
        flags += ["--calib-tokens", "256"]
    out = fresh(world["work"], "out")
    check_outcome(*run(["convert", "--model", world["dense"], "--method", method, *flags, "--out", out]),
                  out, loads_as_checkpoint)


HEAL_FLAGS = {"--calib-tokens": ints(-5, 1500), "--steps": ints(-1, 3), "--lr": floats(-1, 1)}


@budget(6)
@given(some_flags(HEAL_FLAGS))
def test_heal(world, flags):
    if "--steps" not in flags:
        flags += ["--steps", "1"]
    out = fresh(world["work"], "out")
    check_outcome(*run(["heal", "--model", world["lfuc"], *flags, "--out", out]), out, loads_as_checkpoint)


TRAIN_FLAGS = {"--tokens": ints(-5, 400), "--seq-len": ints(-1, 40), "--micro-batch": ints(-1, 3),
               "--global-batch": ints(-1, 5), "--lr": floats(-1, 1), "--min-lr-ratio": floats(-0.5, 1.5),
               "--warmup-steps": ints(-1, 4), "--save-every": ints(-1, 3), "--keep-last": ints(-1, 3),
               "--distill-weight": floats(-0.5, 1.5), "--grad-clip": floats(-1, 2)}


@budget(4)
@given(some_flags(TRAIN_FLAGS))
def test_train(world, flags):
    defaults = {"--tokens": "128", "--seq-len": "16", "--global-batch": "2", "--micro-batch": "2"}
    flags += [x for k, v in defaults.items() if k not in flags for x in (k, v)]
    out = fresh(world["work"], "out")
    check_outcome(*run(["train", "--model", world["lfuc"], "--corpus", world["corpus"], *flags, "--out", out]),
                  out, lambda o: (o / "config.json").is_file() and (o / "train_log.jsonl").is_file())


EVAL_FLAGS = {"--ppl-tokens": ints(-1, 1500), "--batch-size": ints(-1, 5), "--limit": ints(-1, 3),
              "--tasks": st.sampled_from(["none", "piqa", "piqa,arc_easy", "bogus", ",", "none,piqa", ""])}


@budget(8)
@given(some_flags(EVAL_FLAGS))
def test_eval(world, flags):
    if "--tasks" not in flags:
        flags += ["--tasks", "none"]
    if "--limit" not in flags:
        flags += ["--limit", "2"]
    out = fresh(world["work"], "eval.json")
    check_outcome(*run(["eval", "--model", world["lfuc"], *flags, "--out", out]), out,
                  is_results_json({"perplexity", "tasks"}))


EXPORT_FLAGS = {"--quant": st.sampled_from(["f32", "q8_0", "q4_k_m", "fp32", "int8", "int4", "fp16", "8da4w", "x", ""]),
                "--threads": ints(-1, 3), "--max-seq-len": ints(-1, 600), "--head-bits": ints(-1, 9),
                "--moe-lowering": st.sampled_from(["contrib", "dense", "gather", "x"])}


@budget(8)
@given(st.sampled_from(["gguf", "onnx"]), some_flags(EXPORT_FLAGS))
def test_export(world, target, flags):
    out = fresh(world["work"], "out")
    check_outcome(*run(["--target", target, "--model", world["lfuc"], *flags, "--out", out]), out, is_export)


BENCH_FLAGS = {"--prompt-tokens": ints(-1, 300), "--new-tokens": ints(-1, 300), "--threads": ints(-1, 3),
               "--repeats": ints(-1, 2), "--runtime": st.sampled_from(["llama.cpp", "onnxruntime", "onnxruntime-genai",
                                                                      "executorch", "x"])}


@budget(10)
@given(st.sampled_from(["gguf", "onnx"]), some_flags(BENCH_FLAGS))
def test_bench(world, target, flags):
    if "--repeats" not in flags:
        flags += ["--repeats", "1"]
    out = fresh(world["work"], "bench.json")
    check_outcome(*run(["bench", world[target], *flags, "--out", out]), out,
                  is_results_json({"prefill_tokens_per_s", "decode_tokens_per_s"}))


@budget(10)
@given(st.sampled_from(["gguf", "onnx"]), st.text(max_size=40), ints(-1, 8))
def test_generate(world, target, prompt, new_tokens):
    check_outcome(*run(["generate", world[target], "--prompt", prompt, "--max-new-tokens", new_tokens]), None,
                  lambda _: None)


# --- 3. plan files ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 9) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
LAYER = st.integers(-2, 8)
BLOCK = st.fixed_dictionaries({"host": LAYER, "donors": st.lists(LAYER, max_size=4)},
                              optional={"extra": JSON_VALUES})
PLANS = st.one_of(
    st.fixed_dictionaries({"blocks": st.lists(BLOCK, max_size=3)}),
    st.fixed_dictionaries({"blocks": st.lists(st.one_of(BLOCK, JSON_VALUES), max_size=3)}),
    st.dictionaries(st.sampled_from(["blocks", "options", "method", "x"]), JSON_VALUES, max_size=3),
    JSON_VALUES)


@budget(30)
@given(PLANS, st.sampled_from(["plan.yaml", "plan.json", "plan.yml"]), st.sampled_from(["lfuc", "prune"]))
def test_plan_files(world, plan, name, method):
    path = fresh(world["work"], name)
    path.write_text(json.dumps(plan) if name.endswith(".json") else yaml.safe_dump(plan))
    note(path.read_text())
    out = path.parent / "out"

    def valid(o: Path) -> None:
        loads_as_checkpoint(o)
        written = json.loads((o / "d2m_plan.json").read_text())["plan"]["blocks"]
        given_blocks = [b if isinstance(b, dict) else {"host": b[0], "donors": b[1:]} for b in plan["blocks"]]
        assert [dict(host=b["host"], donors=list(b.get("donors", []))) for b in given_blocks] == written

    check_outcome(*run(["convert", "--model", world["dense"], "--method", method, "--plan", path,
                        "--calib-tokens", 256, "--out", out]), out, valid)


@budget(10)
@given(st.binary(max_size=200))
def test_plan_files_of_any_bytes(world, data):
    path = fresh(world["work"], "plan.yaml")
    path.write_bytes(data)
    out = path.parent / "out"
    code, err = run(["convert", "--model", world["dense"], "--plan", path, "--calib-tokens", 256, "--out", out])
    check_outcome(code, err, out, loads_as_checkpoint)


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
