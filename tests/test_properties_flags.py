"""Property-based tests (hypothesis) of every numeric flag of every command, at parse time: a value in its
range is taken as it is, anything else is refused in one `d2m-export: error:` line that names the flag
(whole commands with numeric flags, and the other surfaces that take input: test_properties.py).
"""
from __future__ import annotations

import contextlib
import io
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d2m_export.cli.parser import build_parser
from property_helpers import budget


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
