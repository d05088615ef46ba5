"""Property-based tests (hypothesis) of every surface that takes input: numeric flags (at parse time and in
whole commands) and plan files here; the JSON files we write and read back, and model files, in
test_properties_damaged.py.

The property, everywhere: the command exits 0 with a valid output, or exits 2 with one
`d2m-export: error:` line and nothing at --out. Never a traceback, never a half-written output.

Budgets scale with the hypothesis profile (`--hypothesis-profile long` for a longer local run; the
default `ci` profile keeps the whole file to a few minutes). Each test's budget is in units of
the profile's `max_examples` / 100. The property and the models both files run on: property_helpers.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, note
from hypothesis import strategies as st

from d2m_export.cli.parser import build_parser
from property_helpers import (JSON_VALUES, budget, check_outcome, fresh, is_export, is_results_json,  # noqa: F401
                              loads_as_checkpoint, run, world)                  # world: a fixture


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
            "bench": ["d", "--out", "o"], "generate": ["d", "--prompt", "p"], "tokenize": ["c", "--out", "o"]}


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
